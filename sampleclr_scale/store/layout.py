"""The names of a bag store's files and groups (a leaf: the reader and its checks share
them). The whole layout is described in :mod:`sampleclr_scale.store.bag_store`."""

from __future__ import annotations

SCHEMA_VERSION = 1
"""The store format's version (bumped by any change to the layout)."""
DONORS_FILE = "donors.parquet"
"""The donor table."""
CELLS_FILE = "cells.parquet"
"""The optional cell table."""
SPLITS = ("train", "validation")
"""The donors' splits."""
CODES_GROUP = "codes"
"""The group of per-cell category codes, one array per cell-level column."""
