"""Small array helpers shared across layers (a leaf: imports numpy only)."""

from __future__ import annotations

import numpy as np

__all__ = ["unit_rows"]


def unit_rows(a: np.ndarray) -> np.ndarray:
    """Float64 rows of ``a`` scaled to unit length (zero rows stay zero)."""
    a = np.asarray(a, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)
