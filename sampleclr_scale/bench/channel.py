"""The composition channel's weight, measured on trained runs without retraining.

The channel (:mod:`sampleclr_scale.store.composition`) is a deterministic function of a
run's learned donor vectors, the store's cell-type counts and its batches, applied by
``embed`` after the model. So a sweep over its weight needs no training: for every
embedding ``BASE_seedN`` of a ``bench quality`` scenario directory, this writes
``BASE_cW_seedN`` (the learned vectors, without the channel their run may have appended,
with the channel of weight ``W``: exactly what ``embed`` writes for a model trained with
``composition_channel: W``) and scores them with the
evaluation stage, next to the scenario's other runs and the baselines. With
``--standardise`` the learned block is standardised by the run's training donors
(``BASE_sW_seedN``: what ``embed`` writes for the model trained with ``learned_block:
standardised``; the reference computed from ``WORKDIR/SCENARIO/runs/BASE_seedN`` as
training computes it, :func:`~sampleclr_scale.train.reference.fit_channel`).

Run: ``python -m sampleclr_scale.bench.channel WORKDIR/SCENARIO BASE W [W ...] --json F
[--standardise]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sampleclr_scale.bench.quality import _scores
from sampleclr_scale.config import TrainConfig
from sampleclr_scale.embed.config import DONORS_PARQUET, PROVENANCE_FILE
from sampleclr_scale.evaluate.config import EvaluateConfig
from sampleclr_scale.evaluate.run import evaluate, read_embeddings
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.composition import (
    LearnedReference,
    composition_channel,
    donor_type_counts,
)
from sampleclr_scale.train.artifact import load_model
from sampleclr_scale.train.reference import fit_channel


def channel_sweep(scenario_dir: Path, base: str, weights: list[float],
                  standardise: bool = False) -> dict[str, Any]:
    """Score ``base``'s embeddings with the composition channel of each weight (with
    ``standardise``, beside the learned block standardised by each run's training
    donors).

    Returns
    -------
    dict
        Method -> its scores (as ``bench quality`` reports them), baselines included.
    """
    store = BagStore(str(scenario_dir / "bags.zarr"))
    counts = donor_type_counts(store, "cell_type")
    runs = sorted(p for p in (scenario_dir / "embeddings").glob(f"{base}_seed*"))
    if not runs:
        raise SystemExit(f"no {base}_seed* embeddings under {scenario_dir / 'embeddings'}")
    every = sorted(p for p in (scenario_dir / "embeddings").iterdir() if p.is_dir())
    named = [f"{p.name}={p}" for p in every]  # every trained run, scored alongside
    references = {path: _reference(store, scenario_dir / "runs" / path.name)
                  for path in runs} if standardise else {}
    for weight in weights:
        for path in runs:
            seed = path.name.rsplit("_seed", 1)[1]
            name = f"{base}_{'s' if standardise else 'c'}{weight:g}_seed{seed}"
            out = scenario_dir / "channel" / name
            out.mkdir(parents=True, exist_ok=True)
            _, z = read_embeddings(path)
            z = z[:, :_learned_width(path)]  # a run trained with a channel: without it
            table = pq.read_table(path / DONORS_PARQUET).drop(["z"])
            zc = composition_channel(z, counts, store.donor_batch, weight,
                                     references.get(path))
            vectors = pa.FixedSizeListArray.from_arrays(pa.array(zc.ravel(), pa.float32()),
                                                        zc.shape[1])
            pq.write_table(table.append_column("z", vectors), out / DONORS_PARQUET)
            named.append(f"{name.replace('.', 'p')}={out}")
    metrics = evaluate(named, str(store.location), str(scenario_dir / "channel" / "report"),
                       EvaluateConfig())
    return {name: _scores(method) for name, method in metrics["methods"].items()}


def _reference(store: BagStore, run: Path) -> LearnedReference:
    """The learned reference of the model in ``run`` on its training donors, computed as
    a run with ``learned_block: standardised`` computes it when training ends."""
    model, artifact = load_model(run)
    # a fixed weight: only the reference is wanted here, not the prior's choice of weight
    config = TrainConfig.model_validate({**artifact["train_config"],
                                         "learned_block": "standardised",
                                         "composition_channel": 1.0})
    reference = fit_channel(store, config, model.config, model.state_dict()).reference
    if reference is None:
        raise SystemExit(f"{run}: its run has no composition channel to standardise beside")
    return reference


def _learned_width(embedding: Path) -> int:
    """Width of the model's own vector in an embedding (its ``output_dim``; the columns
    after it are the composition channel its run appended)."""
    provenance = json.loads((embedding / PROVENANCE_FILE).read_text())
    return int(provenance["model_config"]["output_dim"])


def main() -> None:
    """Command line: scenario directory, base method, weights, output JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario_dir", type=Path)
    parser.add_argument("base")
    parser.add_argument("weights", type=float, nargs="+")
    parser.add_argument("--json", required=True)
    parser.add_argument("--standardise", action="store_true",
                        help="the learned block standardised by each run's training donors")
    args = parser.parse_args()
    methods = channel_sweep(args.scenario_dir, args.base, args.weights, args.standardise)
    Path(args.json).write_text(json.dumps({"scenario": args.scenario_dir.name,
                                           "base": args.base, "weights": args.weights,
                                           "standardise": args.standardise,
                                           "methods": methods}, indent=2) + "\n")
    from sampleclr_scale.bench.quality import quality_table

    print(quality_table({"methods": methods}))


if __name__ == "__main__":
    main()
