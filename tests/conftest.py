"""Shared fixtures: a tiny simulated cohort written by the real writers (SOMA, h5ad,
Census-shaped collection) and a bag store ingested from it."""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sampleclr_scale.config import IngestConfig
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.simulate import cohorts as synthetic

META = ["dataset_id", "disease", "severity", "age", "sex", "assay"]


@pytest.fixture(scope="session")
def cohort_spec() -> synthetic.CohortSpec:
    """24 donors of 60-400 cells, 30 genes, an 8-dim embedding, Census quirks included."""
    return synthetic.CohortSpec(n_donors=24, min_cells=60, max_cells=400, n_genes=30,
                                embedding_dim=8, duplicate_fraction=0.05,
                                special_donor_cells=25, seed=7)


@pytest.fixture(scope="session")
def soma_uri(cohort_spec, tmp_path_factory) -> str:
    """The cohort as a SOMA experiment."""
    return str(synthetic.write_soma(cohort_spec, tmp_path_factory.mktemp("soma") / "exp"))


@pytest.fixture(scope="session")
def h5ad_path(cohort_spec, tmp_path_factory) -> str:
    """The same cohort as an .h5ad file (row i = soma_joinid i)."""
    return str(synthetic.write_h5ad(cohort_spec, tmp_path_factory.mktemp("h5ad") / "c.h5ad"))


@pytest.fixture(scope="session")
def census_uri(cohort_spec, tmp_path_factory) -> str:
    """The same cohort as a Census-shaped SOMA collection."""
    path = tmp_path_factory.mktemp("census") / "census"
    return str(synthetic.write_soma(cohort_spec, path, census_like=True))


# The paper's studies as the datasets of one Census-shaped copy, under the Census dataset
# ids their recipes (pipelines/census_*.yaml) select; the last, the HLCA core, is selected
# by none of them. Titles are the CELLxGENE collection names; diseases by severity level.
PAPER_DATASETS = (
    synthetic.CensusDataset(
        "ebc2e1ff-c8f9-466a-acf4-9d291afaf8b3", title="COMBAT PBMC",
        collection_name="A blood atlas of COVID-19 defines hallmarks of disease severity "
        "and specificity",
        diseases=("normal", "COVID-19", "COVID-19", "influenza"), assays=("10x 5' v1",)),
    synthetic.CensusDataset(
        "c7775e88-49bf-4ba2-a03b-93f00447c958", title="Stephenson PBMC",
        collection_name="Single-cell multi-omics analysis of the immune response in COVID-19",
        diseases=("normal", "COVID-19"), assays=("10x 3' v3", "10x 5' v1")),
    synthetic.CensusDataset(
        "3faad104-2ab8-4434-816d-474d8d2641db", title="OneK1K",
        collection_name="Single-cell eQTL mapping identifies cell type-specific genetic "
        "control of autoimmune disease", diseases=("normal",), assays=("10x 3' v2",)),
    synthetic.CensusDataset(
        "9f222629-9e39-47d0-b83f-e08d610c7479", title="HLCA (full)",
        collection_name="The integrated Human Lung Cell Atlas (HLCA)",
        diseases=("normal", "chronic obstructive pulmonary disease", "pulmonary fibrosis"),
        tissues=("nose", "bronchus", "lung parenchyma"), tissues_per_donor=2,
        tissue_general="lung", assays=("10x 3' v2", "10x 3' v3"),
        suspension_types=("cell", "nucleus")),
    synthetic.CensusDataset(
        "066943a2-fdac-4b29-b348-40cede398e4e", title="HLCA (core)",
        collection_name="The integrated Human Lung Cell Atlas (HLCA)",
        tissues=("lung parenchyma",), tissue_general="lung", diseases=("normal",)),
)


@pytest.fixture(scope="session")
def paper_census_uri(tmp_path_factory) -> str:
    """A Census-shaped copy holding the paper's four studies and the HLCA core: 12 donors
    of 60-160 cells each (the HLCA's at two locations each; at least 3 donors of each
    disease), plus the pseudo-donors ``pooled`` (COMBAT) and ``unknown`` (HLCA core); no
    copies within a dataset, as in Census, where ``is_primary_data`` flags copies in other
    datasets."""
    spec = synthetic.CohortSpec(n_donors=60, n_sites=len(PAPER_DATASETS), min_cells=60,
                                max_cells=160, n_genes=20, embedding_dim=8,
                                special_donor_cells=30, seed=25)
    path = tmp_path_factory.mktemp("paper_census") / "census"
    return synthetic.write_soma(spec, path, census_like=True, datasets=PAPER_DATASETS)


def pytest_collection_modifyitems(config, items) -> None:
    """Skip the tests marked ``gpu`` where torch sees no CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def ingest_config(source: str, out, **overrides) -> IngestConfig:
    """The test cohort's ingest settings, with ``overrides``."""
    values = dict(source=source, out=str(out), features="obsm:scvi", meta=META,
                  donor_key=["dataset_id", "donor_id"],
                  cell_columns=["cell_type"], min_cells=40, stratify="disease",
                  primary_only=True, seed=3)
    values.update(overrides)
    return IngestConfig(**values)


S3_SETTINGS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session", autouse=True)
def s3_endpoint():
    """A local S3 server for the whole session, its address in ``AWS_ENDPOINT_URL``.

    moto's server speaks the S3 REST API over HTTP (s3fs's own tests run against it), so
    s3fs, pyarrow and Ray reach it exactly as they reach AWS. It starts before any Ray
    instance, so every Ray worker inherits the settings, and it keeps all tests away from
    real cloud storage. Where ``SAMPLECLR_TESTS_WITHOUT_S3=1`` (the offline GPU check,
    which carries no dev extras), there is no server and the tests that need S3 are
    skipped (:func:`bucket`); anywhere else a missing moto is an error, not a skip.
    """
    import logging
    import os

    if os.environ.get("SAMPLECLR_TESTS_WITHOUT_S3") == "1":
        yield None
        return
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**S3_SETTINGS, "AWS_ENDPOINT_URL": endpoint}.items():
            patch.setenv(name, value)
        yield endpoint
    server.stop()


@pytest.fixture
def bucket(request, s3_endpoint) -> str:
    """A new, empty S3 bucket on the session's server: ``s3://<name>``."""
    import re
    import uuid

    import fsspec

    if s3_endpoint is None:
        pytest.skip("SAMPLECLR_TESTS_WITHOUT_S3=1: no local S3 server")

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{name}-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray instance (2 CPUs) for every test that needs it (a test that
    started one itself, like the demo's, leaves it running for the others)."""
    import ray

    from sampleclr_scale.cluster import start_local_ray

    if not ray.is_initialized():  # a new local Ray, on the loopback interface only
        start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def store_path(soma_uri, tmp_path_factory) -> str:
    """A bag store ingested from the SOMA experiment."""
    out = tmp_path_factory.mktemp("store") / "bags.zarr"
    ingest(ingest_config(soma_uri, out))
    return str(out)


@pytest.fixture(scope="session")
def batch_store(soma_uri, tmp_path_factory) -> str:
    """The test cohort ingested with the site as technical batch."""
    out = tmp_path_factory.mktemp("batch-store") / "bags.zarr"
    ingest(ingest_config(soma_uri, out, batch_key=["dataset_id"]))
    return str(out)




class Locked:
    """Copies of files and folders with permissions taken away, and commands run in child
    processes that those permissions stop.

    Permissions do not stop root, whose ``CAP_DAC_OVERRIDE`` and ``CAP_DAC_READ_SEARCH``
    capabilities override them, so under root each command starts without those two
    (dropped from the child's bounding set before it runs Python: a process of user 0 gets
    the capabilities of that set, so the owner's permissions apply to it).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.locked: list[Path] = []

    def read_only(self, source: str | Path | None = None, name: str = "read-only") -> Path:
        """A copy of ``source`` (same name), or an empty folder ``name``, that the commands
        may read but not write."""
        path = self.root / (Path(source).name if source is not None else name)
        if source is None:
            path.mkdir()
        else:
            (shutil.copytree if Path(source).is_dir() else shutil.copy)(source, path)
        return self._lock(path, ~0o222)

    def unreadable(self, source: str | Path) -> Path:
        """A copy of ``source`` (same name) that the commands may neither read nor list."""
        path = self.root / Path(source).name
        (shutil.copytree if Path(source).is_dir() else shutil.copy)(source, path)
        return self._lock(path, 0, top_only=True)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        """``sampleclr-scale ARGS`` in a child process (its output captured as text)."""
        try:
            return subprocess.run([sys.executable, "-m", "sampleclr_scale.cli", *args],
                                  capture_output=True, text=True, cwd=self.root, timeout=300,
                                  preexec_fn=_drop_permission_overrides
                                  if os.geteuid() == 0 else None)
        except subprocess.SubprocessError as err:  # the capabilities could not be dropped
            pytest.skip(f"root's permission overrides cannot be dropped here: {err}")

    def restore(self) -> None:
        """Give the copies their owner's permissions back (so that they can be removed)."""
        for path in self.locked:
            for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
                p.chmod(p.stat().st_mode | stat.S_IRWXU)

    def _lock(self, path: Path, keep: int, top_only: bool = False) -> Path:
        """``path`` with its permission bits ANDed with ``keep`` (everything in it too,
        unless ``top_only``)."""
        for p in [*([] if top_only or not path.is_dir() else path.rglob("*")), path]:
            p.chmod(stat.S_IMODE(p.stat().st_mode) & keep)
        self.locked.append(path)
        return path


_PR_CAPBSET_DROP = 24  # <linux/prctl.h>
_PERMISSION_OVERRIDES = (1, 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH <linux/capability.h>


def _drop_permission_overrides() -> None:
    """Drop root's permission overrides from this process's bounding set (in a child,
    before it runs its program)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in _PERMISSION_OVERRIDES:
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {capability})")


@pytest.fixture
def locked(tmp_path) -> Iterator[Locked]:
    """A :class:`Locked` whose copies lie in ``tmp_path``."""
    helper = Locked(tmp_path / "locked")
    helper.root.mkdir()
    yield helper
    helper.restore()
