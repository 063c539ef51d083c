"""The batch adversary: gradient reversal, what it reads, and its place in SampleCLR."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from sampleclr_scale.model import ModelConfig, SampleCLR, flatten_views, split_views
from sampleclr_scale.model.adversary import BatchAdversary, reverse_gradient


def test_reverse_gradient_is_the_identity_forward_and_negates_the_gradient():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 3, dtype=torch.float64)
    y = reverse_gradient(x)
    assert torch.equal(y, x)
    (y * weights).sum().backward()
    assert torch.equal(x.grad, -weights)


def test_the_adversary_reads_z_at_unit_norm():
    torch.manual_seed(0)
    adversary = BatchAdversary(in_dim=6, n_batches=3).double()
    z = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(adversary(z), adversary(7.5 * z))
    torch.testing.assert_close(adversary(z), adversary.classifier(F.normalize(z, dim=-1)))


def test_the_encoder_gets_the_negated_gradient_and_the_classifier_the_plain_one():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 6).double()
    adversary = BatchAdversary(in_dim=6, n_batches=3).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    codes = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    F.cross_entropy(adversary(encoder(x)), codes).backward()
    reversed_grads = {n: p.grad.clone() for n, p in [*encoder.named_parameters(),
                                                      *adversary.named_parameters()]}
    for p in [*encoder.parameters(), *adversary.parameters()]:
        p.grad = None
    # the same loss without the reversal
    F.cross_entropy(adversary.classifier(F.normalize(encoder(x), dim=-1)), codes).backward()
    for name, p in encoder.named_parameters():
        torch.testing.assert_close(reversed_grads[name], -p.grad)
    for name, p in adversary.named_parameters():
        torch.testing.assert_close(reversed_grads[name], p.grad)


def _model(batches: int) -> SampleCLR:
    torch.manual_seed(0)
    return SampleCLR(ModelConfig.preset("small", input_dim=5, batch_adversary=batches))


@pytest.mark.parametrize("with_heads", [True, False])
def test_sampleclr_with_an_adversary_returns_batch_logits_per_view(with_heads):
    model = _model(batches=3)
    cells, mask = torch.randn(4, 2, 7, 5), torch.ones(4, 2, 7, dtype=torch.bool)
    out = model(*flatten_views(cells, mask), with_heads=with_heads)
    assert out.batch_logits.shape == (8, 3)
    torch.testing.assert_close(out.batch_logits, model.adversary(out.z))
    first, second = split_views(out)
    torch.testing.assert_close(first.batch_logits, out.batch_logits[0::2])
    torch.testing.assert_close(second.batch_logits, out.batch_logits[1::2])
    assert {id(p) for p in model.adversary_parameters()} == {
        id(p) for p in model.adversary.parameters()}


def test_without_an_adversary_the_model_is_as_before():
    plain, with_adversary = _model(batches=0), _model(batches=3)
    assert plain.adversary is None and plain.adversary_parameters() == []
    cells, mask = torch.randn(3, 7, 5), torch.ones(3, 7, dtype=torch.bool)
    assert plain(cells, mask).batch_logits is None
    # the backbone's weights (and so a saved model.pt) do not change with the adversary
    extra = set(with_adversary.state_dict()) - set(plain.state_dict())
    assert extra and all(key.startswith("adversary.") for key in extra)
    torch.testing.assert_close(plain(cells, mask).z, with_adversary(cells, mask).z)


def test_an_adversary_of_one_batch_is_refused():
    with pytest.raises(ValidationError, match="at least 2 batches"):
        ModelConfig(input_dim=5, batch_adversary=1)
