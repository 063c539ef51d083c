"""The per-type cell-weight table, streamed in record batches, against pandas on the
whole file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sampleclr_scale.errors import InputError
from sampleclr_scale.evaluate.baselines import cell_types
from sampleclr_scale.evaluate.cell_weights import weight_table
from sampleclr_scale.storage import Location
from sampleclr_scale.store.bag_store import BagStore


def _weights_file(store: BagStore, path, rng) -> pd.DataFrame:
    """Up to 40 chosen cells of each donor, two heads of random weights."""
    parts = []
    for donor in range(store.n_donors):
        lo, hi = int(store.donor_ptr[donor]), int(store.donor_ptr[donor + 1])
        rows = np.sort(rng.choice(np.arange(lo, hi), size=min(40, hi - lo), replace=False))
        parts.append(pd.DataFrame({"donor_index": donor, "store_row": rows,
                                   "head_0": rng.random(len(rows)).astype(np.float32),
                                   "head_1": rng.random(len(rows)).astype(np.float32)}))
    frame = pd.concat(parts, ignore_index=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    return frame


def _reference(frame: pd.DataFrame, selected, codes, types) -> tuple[pd.DataFrame, pd.Series]:
    heads = ["head_0", "head_1"]
    frame = frame[frame["donor_index"].isin(selected)]
    normalised = frame[heads] / frame.groupby("donor_index")[heads].transform("mean")
    kind = np.asarray([*types, "unannotated"], dtype=object)[codes[frame["store_row"]]]
    table = normalised.groupby(kind).mean()
    return table, pd.Series(kind).value_counts().reindex(table.index)


def test_streamed_table_equals_the_whole_file_groupby(store_path, tmp_path):
    store = BagStore(store_path)
    frame = _weights_file(store, tmp_path / "cells.parquet", np.random.default_rng(0))
    codes, types = cell_types(store)
    codes = codes.copy()
    codes[::17] = -1  # some cells without a type
    selected = np.arange(0, store.n_donors, 2)
    # batches of 7 rows: every donor's cells span batches
    table, counts = weight_table(Location(str(tmp_path / "cells.parquet")), store, selected,
                                 codes, types, batch_rows=7)
    expected, expected_counts = _reference(frame, selected, codes, types)
    assert list(table.index) == list(expected.index)
    assert "unannotated" in table.index
    # the reference sums float32 weights in float32, the table in float64
    np.testing.assert_allclose(table.to_numpy(), expected.to_numpy(), rtol=1e-6)
    assert counts.tolist() == expected_counts.tolist()


def test_rows_outside_their_donors_are_refused(store_path, tmp_path):
    store = BagStore(store_path)
    frame = _weights_file(store, tmp_path / "cells.parquet", np.random.default_rng(1))
    frame.loc[3, "store_row"] = int(store.donor_ptr[-1]) - 1  # another donor's row
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "bad.parquet")
    codes, types = cell_types(store)
    with pytest.raises(InputError, match="outside the rows of its donors"):
        weight_table(Location(str(tmp_path / "bad.parquet")), store,
                     np.arange(store.n_donors), codes, types)
