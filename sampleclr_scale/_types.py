"""Type aliases shared across packages (a leaf: it imports nothing of the package).

The prior's kinds are named by the prior stage's config and by the X-CLR objective's
config, which sits below the prior package.
"""

from __future__ import annotations

from typing import Literal, get_args

PriorKind = Literal["pseudobulk", "gloscope"]
"""A donor prior's kind: cosine of the donors' mean features, or GloScope's divergence."""
PRIOR_KINDS: tuple[str, ...] = get_args(PriorKind)
"""Every prior kind, in order."""
