"""Obs filters: the grammar against a row-by-row reference and against TileDB-SOMA itself,
refused expressions (code execution included), and h5ad and SOMA ingests that agree."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import tiledbsoma

from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.sources.obs_filter import parse_filter
from sampleclr_scale.store.bag_store import BagStore
from tests.conftest import ingest_config


def _frame() -> pd.DataFrame:
    """Eight rows of each column type, with missing values (None, NaN, pd.NA)."""
    return pd.DataFrame({
        "s": pd.array(["a", "b", None, "c", "a", "b", "c", None], dtype=object),
        "c": pd.Categorical(["x", "y", None, "x", "z", "y", "z", "x"]),
        "i": np.arange(1, 9, dtype=np.int64),
        "f": np.array([0.5, np.nan, 2.5, -1.0, 3.0, np.nan, 1.0, 2.0]),
        "b": np.array([True, False, True, False, True, False, True, False]),
        "n": pd.array([1, 2, None, 2, 1, None, 3, 2], dtype="Int64"),
    })


def k(value: object) -> bool:
    """Whether a cell's value is known: a missing value fails every comparison."""
    return value is not None and value is not pd.NA and value == value


# expression -> the rows it selects, as a plain function of one row
CASES = {
    "s == 'a'": lambda r: k(r["s"]) and r["s"] == "a",
    "s != 'a'": lambda r: k(r["s"]) and r["s"] != "a",
    "not s == 'a'": lambda r: k(r["s"]) and r["s"] != "a",
    "'b' <= s": lambda r: k(r["s"]) and r["s"] >= "b",
    "s in ('a', 'c')": lambda r: k(r["s"]) and r["s"] in ("a", "c"),
    "s not in ['a']": lambda r: k(r["s"]) and r["s"] != "a",
    "c == 'x'": lambda r: k(r["c"]) and r["c"] == "x",
    "c != 'x'": lambda r: k(r["c"]) and r["c"] != "x",
    "c in ['x', 'q']": lambda r: k(r["c"]) and r["c"] == "x",
    "not c in ['x', 'z']": lambda r: k(r["c"]) and r["c"] not in ("x", "z"),
    "i > 2": lambda r: r["i"] > 2,
    "1 < i <= 4": lambda r: 1 < r["i"] <= 4,
    "i in [1, 3, 99]": lambda r: r["i"] in (1, 3, 99),
    "i != 3 or f > 1": lambda r: r["i"] != 3 or (k(r["f"]) and r["f"] > 1),
    "f > 1": lambda r: k(r["f"]) and r["f"] > 1,
    "f != 2.5": lambda r: k(r["f"]) and r["f"] != 2.5,
    "not (f > 1)": lambda r: k(r["f"]) and r["f"] <= 1,
    "f in [0.5, 3]": lambda r: k(r["f"]) and r["f"] in (0.5, 3.0),
    "-1 < f": lambda r: k(r["f"]) and r["f"] > -1,
    "f >= -1.0": lambda r: k(r["f"]) and r["f"] >= -1,
    "b == True": lambda r: r["b"],
    "b != True": lambda r: not r["b"],
    "not b == False": lambda r: r["b"],
    "n == 2": lambda r: k(r["n"]) and r["n"] == 2,
    "n != 2": lambda r: k(r["n"]) and r["n"] != 2,
    "n not in [1, 3]": lambda r: k(r["n"]) and r["n"] not in (1, 3),
    "not (s == 'a' or i > 4)": lambda r: k(r["s"]) and r["s"] != "a" and r["i"] <= 4,
    "not (s == 'a' and c == 'x')":
        lambda r: (k(r["s"]) and r["s"] != "a") or (k(r["c"]) and r["c"] != "x"),
    "(s == 'a' or s == 'c') and not (f > 2 or b == False)":
        lambda r: k(r["s"]) and r["s"] in ("a", "c") and k(r["f"]) and r["f"] <= 2 and r["b"],
}


@pytest.mark.parametrize("expr", CASES)
def test_filter_matches_a_row_by_row_reference(expr):
    frame = _frame()
    expected = [bool(CASES[expr](row)) for row in frame.to_dict("records")]
    mask = parse_filter(expr).evaluate(frame)
    assert mask.dtype == bool and mask.tolist() == expected


def test_filter_names_its_columns_in_order_and_reads_no_other():
    parsed = parse_filter("b == True and (s == 'a' or not c in ['x']) and 1 < i < 5")
    assert parsed.columns == ["b", "s", "c", "i"]
    mask = parse_filter("s == 'a'").evaluate(_frame()[["s"]])  # only its column is needed
    assert mask.tolist() == [True, False, False, False, True, False, False, False]


@pytest.fixture(scope="module")
def soma_frame(tmp_path_factory) -> str:
    """The rows of :func:`_frame` as a TileDB-SOMA DataFrame (``soma_joinid`` = row)."""
    table = pa.Table.from_pandas(_frame(), preserve_index=False)
    table = table.append_column("soma_joinid", pa.array(np.arange(len(table), dtype=np.int64)))
    uri = str(tmp_path_factory.mktemp("filter") / "frame")
    with tiledbsoma.DataFrame.create(uri, schema=table.schema, domain=[(0, 99)]) as frame:
        frame.write(table)
    return uri


def _soma_rows(uri: str, value_filter: str) -> list[int]:
    with tiledbsoma.DataFrame.open(uri) as frame:
        return frame.read(value_filter=value_filter).concat()["soma_joinid"].to_pylist()


@pytest.mark.parametrize("expr", CASES)
def test_soma_selects_the_rows_that_the_h5ad_evaluation_selects(expr, soma_frame):
    """The expression handed to tiledbsoma (``not`` pushed down, so tiledbsoma 2.3's crash
    on ``not (a or b)`` never happens) selects the same rows as our own evaluation."""
    parsed = parse_filter(expr)
    assert "not (" not in parsed.soma_expression
    selected = np.flatnonzero(parsed.evaluate(_frame())).tolist()
    assert _soma_rows(soma_frame, parsed.soma_expression) == selected


MARKER = "MARKER"
# expression (with MARKER for a file the code would create) -> the part the error names
REFUSED = {
    f"__import__('os').system('touch {MARKER}')": "__import__('os').system",
    f"cell_type == cell_type.to_csv.__globals__['inspect'].os.system('touch {MARKER}')":
        "cell_type.to_csv.__globals__['inspect'].os.system",
    f"cell_type.__class__.__init__.__globals__['os'].system('touch {MARKER}') == 0":
        "cell_type.__class__.__init__.__globals__",
    "cell_type == @marker": "does not parse",
    "`cell type` == 'B cell'": "does not parse",
    "cell_type.str.contains('T') == True": "cell_type.str.contains('T')",
    "(lambda: 1)() == 1": "(lambda: 1)()",
    "cell_type == f'{disease}'": "f'{disease}'",
    "age + 1 > 50": "age + 1",
    "age > 50 * 2": "50 * 2",
    "cell_type[0] == 'B'": "cell_type[0]",
    "cell_type == disease": "`disease` is a name where a literal belongs",
    "age is None": "uses `is`",
    "age == None": "`None` is not a literal",
    "disease in []": "is empty",
    "disease in normal": "is not a list",
    "(age > 1) & (age < 9)": "uses & or |",
    "is_primary_data": "is not a condition",
    "age > 1e400": "not a finite number",
    "age > 2**70": "`2**70` is not a literal",
    "severity in [1] == True": "chains an `in` test",
}


@pytest.mark.parametrize("expr", REFUSED)
def test_expressions_outside_the_grammar_are_refused(expr, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="(?s)" + re.escape(REFUSED[expr])) as err:
        parse_filter(expr)
    assert "column OP literal" in str(err.value)  # the fix states the grammar
    assert not (tmp_path / MARKER).exists()


# expressions whose literals do not fit the column types: tiledbsoma refuses these (or,
# for the last three, answers them wrongly: ``i >= 2.5`` as ``i >= 2``, ``i == True`` as
# ``i == 1``), so an h5ad source must refuse them too
TYPE_REFUSED_BY_SOMA = ["c < 'y'", "s == 1", "i == 'a'", "b in [True]", "i in [2.0]",
                        "s in ['a', 1]"]
TYPE_REFUSED = [*TYPE_REFUSED_BY_SOMA, "i >= 2.5", "i == True", "f == 'x'"]


@pytest.mark.parametrize("expr", TYPE_REFUSED)
def test_literals_that_do_not_fit_the_column_type_are_refused(expr, soma_frame):
    parsed = parse_filter(expr)
    with pytest.raises(InputError, match=r"(?s)obs filter .* column .*fix: compare string"):
        parsed.evaluate(_frame())
    if expr in TYPE_REFUSED_BY_SOMA:
        with pytest.raises(tiledbsoma.SOMAError):
            _soma_rows(soma_frame, parsed.soma_expression)


@pytest.mark.parametrize("source", ["h5ad_path", "soma_uri"])
@pytest.mark.parametrize("expr", [e for e in REFUSED if MARKER in e] + ["cell_type == @os"])
def test_code_in_an_obs_filter_never_runs(source, expr, request, tmp_path, monkeypatch):
    """Before the fix, the ``to_csv.__globals__`` chain ran ``os.system`` on an h5ad."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s.zarr"
    with pytest.raises(InputError, match="obs filter"):
        ingest(ingest_config(request.getfixturevalue(source), out, obs_filter=expr))
    assert not (tmp_path / MARKER).exists()
    assert not out.exists()


@pytest.mark.parametrize("source", ["h5ad_path", "soma_uri"])
def test_both_sources_refuse_a_float_on_an_integer_column(source, request, tmp_path):
    """Before the fix the h5ad kept severity >= 2 and tiledbsoma severity >= 1."""
    with pytest.raises(InputError, match=r"compares int column 'severity' with 1\.5"):
        ingest(ingest_config(request.getfixturevalue(source), tmp_path / "s.zarr",
                             obs_filter="severity >= 1.5"))


def test_h5ad_and_soma_select_the_same_cohort(h5ad_path, soma_uri, tmp_path):
    """``not`` over ``or``, a missing age and a categorical ``in``: the same cells from
    both sources, and the cells a direct pandas selection keeps (missing ages fail)."""
    expr = ("cell_type in ['CD14 monocyte', 'CD4 T cell', 'B cell'] "
            "and not (age > 60 or sex == 'female')")
    stores = []
    for source in (h5ad_path, soma_uri):
        out = tmp_path / f"{len(stores)}.zarr"
        ingest(ingest_config(source, out, obs_filter=expr, min_cells=10, stratify=None))
        stores.append(BagStore(out))
    a, b = stores
    assert np.array_equal(np.sort(a.source_joinid()), np.sort(b.source_joinid()))
    pd.testing.assert_frame_equal(a.donors.astype(str), b.donors.astype(str))

    with tiledbsoma.Experiment.open(soma_uri) as exp:
        obs = exp.obs.read().concat().to_pandas().set_index("soma_joinid")
    wanted = (obs["cell_type"].isin(["CD14 monocyte", "CD4 T cell", "B cell"])
              & (obs["age"] <= 60) & (obs["sex"] != "female") & obs["is_primary_data"])
    for store in stores:
        assert store.attrs["counts"]["cells_matching_filter"] == int(wanted.sum())
        assert wanted.loc[store.source_joinid()].all()
    assert a.n_donors > 1
