"""evaluate writes only its own kind of output, staged and published whole, under a lock."""

from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from sampleclr_scale.errors import InputError
from sampleclr_scale.evaluate.config import EvaluateConfig
from sampleclr_scale.evaluate.report import md, write_report
from sampleclr_scale.evaluate.run import evaluate
from sampleclr_scale.storage import Location, claim
from sampleclr_scale.store.bag_store import BagStore
from tests.evaluate.test_evaluate import _write_embedding

CONFIG = EvaluateConfig(seeds=1)


@pytest.fixture
def emb(store_path, tmp_path):
    store = BagStore(store_path)
    Z = np.random.default_rng(0).normal(size=(store.n_donors, 4))
    return _write_embedding(tmp_path / "emb", store, Z, seed=0)


def test_a_foreign_folder_or_an_input_is_never_written(store_path, emb, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    (mine / "data.csv").write_text("1,2")
    with pytest.raises(InputError, match=r"(?s)is a folder holding .*data.csv.*not a report"):
        evaluate([str(emb)], store_path, str(mine), CONFIG)
    assert (mine / "report.md").read_text() == "my notes"
    (tmp_path / "file").write_text("mine")
    with pytest.raises(InputError, match=r"is a file, not a report"):
        evaluate([str(emb)], store_path, str(tmp_path / "file"), CONFIG)
    assert (tmp_path / "file").read_text() == "mine"
    for where in (store_path, str(emb), f"{emb}/report"):
        with pytest.raises(InputError, match="which this stage reads"):
            evaluate([str(emb)], store_path, where, CONFIG)
    assert not (emb / "report").exists() and not (emb / "metrics.json").exists()


def test_a_failed_run_leaves_the_last_report_whole(store_path, emb, tmp_path):
    out = tmp_path / "report"
    evaluate([str(emb)], store_path, str(out), CONFIG)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert set(before) == {"metrics.json", "report.md"}
    # cell weights without heads fail while the figures are drawn, after the scores
    weights = pq.read_table(emb / "cell_weights.parquet")
    pq.write_table(weights.select(["donor_index", "store_row"]), emb / "cell_weights.parquet")
    with pytest.raises(InputError, match="needs columns donor_index, store_row, head_0"):
        evaluate([str(emb)], store_path, str(out), CONFIG)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb", "report"]  # no staging left


def test_a_second_run_on_the_same_out_is_refused(store_path, emb, tmp_path):
    out = tmp_path / "report"
    with claim(Location(out)), pytest.raises(InputError, match="another run is writing"):
        evaluate([str(emb)], store_path, str(out), CONFIG)
    evaluate([str(emb)], store_path, str(out), CONFIG)  # free again
    evaluate([str(emb)], store_path, str(out), CONFIG)  # and a report replaces a report
    assert (out / "report.md").is_file()


HOSTILE = "d1\n# heading <script>alert(1)</script> | x ![i](http://e/x.png) `c`"


def test_md_shows_any_value_as_its_text():
    assert md("a\nb\r\n\tc") == "a b c"
    assert md("# heading") == "\\# heading"
    assert md("<script>") == "&lt;script&gt;"
    assert md("a | b") == "a \\| b"
    assert md("[x](y) *b* `c` ~~s~~") == "\\[x\\](y) \\*b\\* \\`c\\` \\~\\~s\\~\\~"
    assert md("held_out _em_ a-b 1.5") == "held_out \\_em\\_ a-b 1.5"


def test_hostile_names_stay_text_in_the_report(store_path, emb, tmp_path):
    import json

    out = tmp_path / "report"
    metrics = evaluate([str(emb)], store_path, str(out), CONFIG)
    metrics = json.loads(json.dumps(metrics))
    metrics["trajectory_root"] = HOSTILE  # a donor id
    metrics["methods"] = {HOSTILE if k == "emb" else k: v for k, v in metrics["methods"].items()}
    metrics["skipped"][HOSTILE] = HOSTILE
    metrics["figures"]["maps"] = {HOSTILE: "figures/map x.png"}
    text = write_report(metrics, out).read_text()
    assert "<script>" not in text and "![i](" not in text and "`c`" not in text
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert not [h for h in headings if "heading" in h]
    table = [line for line in text.splitlines() if line.startswith("| ")]
    widths = {len(re.findall(r"(?<!\\)\|", line)) for line in table[:6]}
    assert len(widths) == 1, table[:6]  # every row of the score table has its columns
    assert "figures/map%20x.png" in text
