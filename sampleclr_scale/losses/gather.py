"""Gathering tensors from all data-parallel processes, with and without gradients.

A contrastive loss over the *global* batch needs every rank's embeddings as columns. The
gather must pass gradients back to the rank that produced each row: rank ``r``'s rows are
used as columns by the losses of all ranks, so their gradient is the sum over ranks of the
incoming gradient at ``r``'s slice. The backward below does exactly that (sum the full
incoming gradient over ranks, then take this rank's slice). Three look-alikes give the
right loss value but wrong gradients (no reduction, select-then-reduce, gathering without
gradients); ``tests/losses/test_distributed_loss.py`` shows each one failing against a
1-process run.

All functions use the default process group and are the identity when none is
initialised or it has a single process, so the same code runs on one CPU and under DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from sampleclr_scale._distributed import rank_and_world_size
from sampleclr_scale.errors import InputError


def _all_gather_cat(x: Tensor, world_size: int) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums gradients over ranks.

    The global-batch gather used by SimCLR-style losses (Chen et al. 2020, "A Simple
    Framework for Contrastive Learning of Visual Representations"), with the backward of
    lightly's fix (lightly PR 1531): all_reduce(SUM) the incoming gradient, then return
    this rank's slice.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        rank, world_size = rank_and_world_size()
        ctx.rank, ctx.n_local = rank, x.shape[0]
        return _all_gather_cat(x, world_size)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # all_reduce is in place; never touch autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.n_local
        return grad[start : start + ctx.n_local]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, differentiably.

    Parameters
    ----------
    x : Tensor
        ``[n, ...]`` local tensor. Every rank must pass the same shape (the sampler deals
        the same number of donors to every rank); a mismatch fails inside the collective.

    Returns
    -------
    Tensor
        ``[world_size * n, ...]``, rank ``r``'s rows at ``r * n : (r + 1) * n``. The
        gradient reaching ``x`` is the sum over ranks of the gradient at this rank's slice,
        so a loss that is averaged over ranks by DDP gets exact gradients. ``x`` itself
        when no process group is initialised or the world size is 1.
    """
    if rank_and_world_size()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, without gradients.

    For tensors that carry no gradient, such as integer donor ids. Same shape rule and
    layout as :func:`gather_with_grad`; ``x`` itself without a multi-process group.
    """
    world_size = rank_and_world_size()[1]
    if world_size == 1:
        return x
    with torch.no_grad():
        return _all_gather_cat(x, world_size)


def upcast_views(z_a: Tensor, z_b: Tensor, loss: str) -> tuple[Tensor, Tensor]:
    """Check two views of a pairwise loss and cast them to float32, or float64 if given."""
    if z_a.ndim != 2 or z_a.shape != z_b.shape or z_a.shape[0] == 0:
        raise InputError(
            f"{loss} views must be two non-empty [b, D] tensors of the same shape, got "
            f"{tuple(z_a.shape)} and {tuple(z_b.shape)}",
            "pass the representations of the two views of the same b bags, row i of both "
            "from the same donor",
        )
    if not (z_a.is_floating_point() and z_b.is_floating_point()):
        raise InputError(
            f"{loss} views must be floating point, got {z_a.dtype} and {z_b.dtype}",
            "pass the encoder outputs, not labels or ids",
        )
    dtype = torch.promote_types(torch.promote_types(z_a.dtype, z_b.dtype), torch.float32)
    return z_a.to(dtype), z_b.to(dtype)


def global_views(z_a: Tensor, z_b: Tensor, loss: str, purpose: str) -> tuple[Tensor, Tensor]:
    """Both views of the global batch, gathered with gradients; at least 2 rows."""
    Z_a, Z_b = gather_with_grad(z_a), gather_with_grad(z_b)
    if Z_a.shape[0] < 2:
        raise InputError(f"{loss} needs at least 2 rows in the global batch {purpose}",
                         "train with more than one bag per step")
    return Z_a, Z_b
