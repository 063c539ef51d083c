"""The demo end to end at a tiny size: simulate, ingest, prior, train (2 Ray workers),
embed, write back, evaluate, report; and a re-run that resumes instead of redoing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sampleclr_scale.cli import main


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = Path("demo")  # relative, as in the README's `make demo`
    assert main(["demo", "--out", str(out), "--donors", "24", "--epochs", "2",
                 "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "pseudobulk" in printed
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    methods = set(metrics["methods"])
    assert {"sampleclr_unsupervised", "sampleclr_unsupervised_centrality",
            "sampleclr_supervised_prior", "pseudobulk", "composition", "random"} <= methods
    report = (out / "report" / "report.md").read_text()
    for figure in (out / "report" / "figures").glob("*.png"):
        assert f"figures/{figure.name}" in report
    assert (out / "cohort.soma" / "sampleclr").exists()  # written back into the experiment
    assert (out / "bags.zarr" / "embeddings" / "sampleclr_supervised_prior").exists()

    # a second run finds every stage complete and only re-evaluates
    outputs = [*out.glob("runs/*/model.pt"), *out.glob("embeddings/*/donor_embeddings.parquet")]
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    assert main(["demo", "--out", str(out), "--donors", "24", "--epochs", "2",
                 "--workers", "2"]) == 0
    assert len(stamps) == 5 and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
