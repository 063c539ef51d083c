"""The kinds of donor prior (a leaf: the stage and loss configs name them)."""

from __future__ import annotations

from typing import Literal, get_args

PriorKind = Literal["pseudobulk", "gloscope"]
"""A prior's kind: cosine of the donors' mean features, or GloScope's divergence."""
KINDS: tuple[str, ...] = get_args(PriorKind)
"""Every kind, in order."""
