"""Typed, validated configuration of each stage.

Every config is a frozen pydantic model that refuses unknown keys, so a typo in a YAML
file is an error naming the key, not a silently ignored setting.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sampleclr_scale.errors import InputError
from sampleclr_scale.losses.configs import default_loss_config, loss_config_type


class StageConfig(BaseModel):
    """Base of all stage configs: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str = "config") -> Self:
        """Validate a mapping, turning pydantic's report into an :class:`InputError`."""
        return cls.from_layers({where: values})

    @classmethod
    def from_layers(cls, layers: dict[str, dict[str, Any]]) -> Self:
        """Validate mappings merged in order, a later one's keys winning.

        Parameters
        ----------
        layers
            Mappings by where they were given, e.g. ``{"train.yaml": ..., "command line":
            ...}``.

        Raises
        ------
        InputError
            Pydantic's report, naming where the offending keys were given (see
            :func:`error_sources`), with the valid keys for an unknown one.
        """
        values = {key: value for layer in layers.values() for key, value in layer.items()}
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            unknown = any(e["type"] == "extra_forbidden" for e in err.errors())
            raise InputError(
                f"{error_sources(err, layers)}: not a valid {cls.__name__}: "
                f"{describe_errors(err)}",
                f"valid keys: {sorted(cls.model_fields)}" if unknown else None,
            ) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        """Load and validate a YAML file."""
        return cls.from_mapping(read_yaml(path), where=str(path))


def describe_errors(err: ValidationError) -> str:
    """Pydantic's report as one line: ``location: message; ...``."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in err.errors()
    )


def error_sources(err: ValidationError, layers: dict[str, dict[str, Any]]) -> str:
    """Where the keys of pydantic's errors were given: the last layer that set each
    top-level key, every layer for an error on the whole mapping or on a missing key."""
    origin = {key: where for where, layer in layers.items() for key in layer}
    named = {origin.get(e["loc"][0]) if e["loc"] else None for e in err.errors()}
    return " and ".join(where for where in layers if None in named or where in named)


def default_help(cls: type[BaseModel], name: str) -> str:
    """``default X``: the default of config field ``name`` for a command-line help text,
    stated once, in the config."""
    return f"default {cls.model_fields[name].default}"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, with clear errors for unreadable or non-mapping files."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"cannot read config {path}: {err}",
                         "pass a readable YAML file") from None
    if not isinstance(values, dict):
        raise InputError(f"config {path} is not a mapping", "write key: value pairs")
    return values


def is_census(source: str) -> bool:
    """Whether ``source`` names CELLxGENE Census (``census``, ``census:VERSION_OR_URI``)."""
    return source == "census" or source.startswith("census:")


_FEATURES = re.compile(r"^(obsm:.+|pca:[1-9][0-9]*)$")


class IngestConfig(StageConfig):
    """How a cohort is selected from a source and turned into a bag store."""

    source: str
    """SOMA experiment URI, ``.h5ad`` path, or ``census[:VERSION_OR_URI]``."""
    out: str
    """Path of the bag store to create (a Zarr v3 group)."""
    features: str = "obsm:scvi"
    """Cell features: ``obsm:NAME`` (an existing embedding; for Census also the URI of a
    hosted embedding array) or ``pca:N`` (library-size normalisation, log1p, PCA to N)."""
    features_like: str | None = None
    """A bag store whose feature space the new store is put in, instead of ``features``
    (e.g. the training store of the model that is to embed this cohort): its embedding
    name (of the same width), or its stored PCA (genes matched by id, its normalisation,
    mean and components) applied to this source's ``layer``; the new store gets the same
    feature-spec fingerprint, which ``embed`` checks."""
    max_missing_genes: float = Field(default=0.1, ge=0.0, le=1.0)
    """With ``features_like`` and PCA features: the largest fraction of the spec's genes
    the source may lack. Each missing gene is taken at the spec's mean (it adds nothing to
    any component) and reported; more missing is refused, as the features would then be
    another space in all but name."""
    layer: str = "raw"
    """X layer read for ``pca:N`` features (``raw`` as in Census; ``X`` by default for
    .h5ad sources)."""
    measurement: str = "RNA"
    """SOMA measurement holding X and obsm."""
    organism: str = "homo_sapiens"
    """Census organism."""
    donor_key: list[str] = Field(default_factory=lambda: ["donor_id"])
    """Obs column(s) that identify a donor; for Census sources the default is
    ``dataset_id`` + ``donor_id``, because Census donor ids are unique only within a
    dataset. Left at the default on a source with a ``dataset_id`` column whose donor ids
    repeat across datasets, it becomes ``dataset_id`` + ``donor_id`` too (with a warning);
    set explicitly to a key with ``donor_id`` there, it is an error."""
    obs_filter: str | None = None
    """Cell filter in a subset of the SOMA value-filter syntax, the same for every source
    (:mod:`sampleclr_scale.sources.obs_filter`): ``column OP literal``, ``column in [...]``,
    ``and``/``or``/``not``; parsed, never run as Python."""
    primary_only: bool = False
    """Keep only ``is_primary_data == True`` cells (default on for Census sources)."""
    drop_donors: list[str] = Field(default_factory=lambda: ["pooled", "unknown"])
    """Donor id values that do not name one person; their cells are dropped."""
    min_cells: int = Field(default=50, ge=1)
    """Donors with fewer cells (after all filters) are dropped and counted."""
    meta: list[str] = Field(default_factory=list)
    """Donor-level obs columns kept in the donor table (e.g. disease, sex, age)."""
    cell_columns: list[str] | None = None
    """Cell-level obs columns kept in the cell table and as per-row codes (e.g.
    cell_type). None (the default): ``cell_type`` when the source has that column, so
    that training balances its views over cell types and the evaluation scores the
    cell-type baselines without an optional flag; an empty list keeps none."""
    batch_key: list[str] = Field(default_factory=list)
    """Obs column(s) naming a donor's technical batch (e.g. ``dataset_id``, ``assay``, a
    site or pool column); the batch is the combination of their values and must be the
    same for all cells of a donor. The columns are kept in the donor table, each donor gets
    a ``batch`` code, and the store gets per-batch feature means and standard deviations
    (``batch_mean``, ``batch_std``) for standardisation on read. Empty: no batches."""
    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    """Fraction of donors held out for validation."""
    stratify: str | None = None
    """Donor-table column whose class balance the split keeps."""
    group_by: str | None = None
    """Donor-table column whose groups (e.g. site) are kept on one side of the split."""
    seed: int = 0
    """Seed of the split, the within-donor cell order and the PCA subsample."""
    pca_fit_cells: int = Field(default=20_000, ge=100)
    """Cells in the random subsample that the PCA is fitted on."""
    pca_genes: int = Field(default=2_000, ge=2)
    """Most variable genes (in the subsample) kept before PCA."""
    dtype: str = Field(default="float32", pattern="^(float32|float16)$")
    """Storage type of the feature matrix."""
    chunk_rows: int = Field(default=4096, ge=64)
    """Rows per Zarr chunk of the feature matrix."""
    read_block: int = Field(default=65_536, ge=1024)
    """Cells read from the source per sequential block."""
    read_workers: int = Field(default=1, ge=1)
    """Ray actors reading the source's blocks in parallel, each with the source opened
    itself (on the cluster named by ``RAY_ADDRESS``, else a local Ray; one CPU each); this
    process spills their rows as they arrive. 1: read here, without Ray. Worth more when
    each read waits on the network (Census on S3) or computes (``pca:N``); the store is
    the same either way."""
    bucket_bytes: int = Field(default=128 * 2**20, ge=2**20)
    """Feature bytes held in memory while a block of donors is reordered."""
    overwrite: bool = False
    """Replace an existing bag store (atomically, after the new one is complete); anything
    else at ``out`` is refused."""

    @model_validator(mode="before")
    @classmethod
    def _source_defaults(cls, values: Any) -> Any:
        """Census needs ``dataset_id`` + ``donor_id`` and primary cells; h5ad reads ``X``."""
        if not isinstance(values, dict):
            return values
        source = str(values.get("source", ""))
        if is_census(source):
            values = {"donor_key": ["dataset_id", "donor_id"], "primary_only": True, **values}
        elif source.endswith(".h5ad"):
            values = {"layer": "X", **values}
        return values

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not _FEATURES.match(self.features):
            raise ValueError(f"features must be obsm:NAME or pca:N, got {self.features!r}")
        if not self.donor_key:
            raise ValueError("donor_key needs at least one column")
        if self.features_like is not None and "features" in self.model_fields_set:
            raise ValueError("features_like takes the features of its store: leave out "
                             "features")
        return self


DEFAULT_GLOBAL_BATCH = 32
"""Donors per optimiser step when ``loader.batch_size`` is unset. The defaults were chosen
at 32 (4 steps an epoch on a 128-donor training split); 2 workers of 32 each (64 a step,
2 steps an epoch, the learning rate scaled by sqrt 2) lost 0.05 of SPARE total on the
quality benchmark's ``composition`` cohort (benchmarks/README.md, "The defaults as
`train` runs them")."""


class LoaderConfig(StageConfig):
    """How two-view donor bags are sampled and batched."""

    batch_size: int | None = Field(default=None, ge=1)
    """Donors per batch on one process (the global batch is this times the world size).
    None: :data:`DEFAULT_GLOBAL_BATCH` donors per optimiser step in all, split over the
    processes (at least 1 each; :meth:`process_batch`), the global batch the defaults were
    measured at, whatever the number of workers. Set it to grow the batch with the
    workers (e.g. 32 a GPU)."""
    cells_per_view: int = Field(default=1000, ge=1)
    """Cells per view ``m``; with ``min_cells_per_view`` set, the largest view size."""
    min_cells_per_view: int | None = Field(default=None, ge=1)
    """Smallest view size: view sizes are then drawn uniformly in
    ``[min_cells_per_view, cells_per_view]`` and shorter views are padded and masked."""
    seed: int = 0
    """Seed of the donor order and of the views; epoch and donor are mixed in."""
    drop_last: bool = False
    """Drop the donors of an incomplete last global batch instead of padding it with
    donors from the start of the epoch's order."""
    prefetch: int = Field(default=4, ge=1)
    """Batches read ahead by the background thread."""
    num_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes (spawned); 0 reads in a thread of the main process."""
    balance: str | None = "auto"
    """Cell-level column (a ``--cell-columns`` column, e.g. ``cell_type``) whose
    categories every view holds in the cohort's overall proportions: each view draws
    its share of each category from a window of the donor's cells (with replacement for
    a category the window has too few of), so composition no longer tells donors apart
    and the model learns what differs within cell types. ``"auto"``: ``cell_type`` when
    the store has it, else uniform views; None: uniform views (the paper's)."""
    balance_strength: float = Field(default=1.0, ge=0.0, le=1.0)
    """How fully views are balanced over ``balance``: 1 gives every view the cohort's
    composition, 0 the donor's own (drawn per category), a value ``s`` between the donor's
    own with its log-ratios to the cohort's multiplied by ``1 - s``, so that the learned
    vector sees composition, damped (``loading/views/balanced.pool_targets``). Measured
    at 0.5 (quality benchmark, seed 0): severity 0.77 on ``composition`` (0.79 fully
    balanced) and 0.24 on ``shape_celltype`` (0.88): the composition seen drowns the
    within-type signal and gains nothing the composition channel does not give, so the
    default stays 1 (benchmarks/README.md, "Cohorts like real ones")."""
    read_threads: int | None = Field(default=None, ge=1)
    """Donors of a batch read at once by each reading process. On object storage every
    read waits for a network round trip, so many reads in flight hide the latency; a
    local disk gains nothing. Default: 1 for a local store, 16 for a store behind a URI."""
    reader: Literal["auto", "zarr", "mmap"] = "auto"
    """How rows are read from the store (:mod:`sampleclr_scale.loading.readers`): ``mmap``
    copies them out of memory maps of the chunk files (a local store whose features are
    stored uncompressed, as ingest writes them), ``zarr`` reads through Zarr (any store:
    compressed, sharded, remote), ``auto`` maps what it can and reads the rest through
    Zarr. The batches are the same with either."""
    resident: Literal["auto", "always", "never"] = "auto"
    """Where training draws the views from: ``"always"`` loads the store's features once
    into the training device's memory (:mod:`sampleclr_scale.loading.resident`) and draws the
    same views as streaming there, by index, with no store reads per step (then
    ``num_workers``, ``read_threads`` and ``reader`` are not used); ``"never"`` streams them
    from the store; ``"auto"`` loads them on a GPU when they take less than half of its free
    memory, and streams on CPU, where reading keeps up with training."""
    resident_dtype: Literal["store", "bfloat16"] = "store"
    """Type of the device-resident features: the store's (float32 or float16: the views
    equal the streamed ones), or bfloat16 (half the memory of float32, each feature rounded
    to bfloat16)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.min_cells_per_view is not None and self.min_cells_per_view > self.cells_per_view:
            raise ValueError("min_cells_per_view must not exceed cells_per_view")
        return self

    @property
    def view_range(self) -> tuple[int, int]:
        """Smallest and largest number of cells in a view."""
        return (self.min_cells_per_view or self.cells_per_view, self.cells_per_view)

    def process_batch(self, world_size: int) -> int:
        """Donors per batch on each of ``world_size`` processes: ``batch_size``, or
        :data:`DEFAULT_GLOBAL_BATCH` split over them when it is unset."""
        if self.batch_size is not None:
            return self.batch_size
        return max(1, DEFAULT_GLOBAL_BATCH // world_size)


class TaskConfig(StageConfig):
    """A supervised task on a donor-table column."""

    column: str
    """Donor-table column holding the labels (also the task's name)."""
    kind: Literal["classification", "ordinal", "regression"]
    """Classification (cross-entropy), ordinal regression (C-1 cumulative logits) or
    regression (MSE on standardised targets)."""
    weight: float = Field(default=1.0, ge=0.0)
    """Weight of this task's loss in the supervised loss."""


LossConfig = loss_config_type()
"""The self-supervised objective: one of the configs registered in
:mod:`sampleclr_scale.losses.configs` (where the objectives' settings are),
chosen by ``kind``; a mapping without ``kind`` is X-CLR."""


class OptimConfig(StageConfig):
    """AdamW with a learning rate scaled to the global batch, warm-up, cosine decay."""

    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    """Learning rate at ``reference_batch`` donors per global step."""
    reference_batch: int = Field(default=32, ge=1)
    """Global batch size at which ``lr`` applies."""
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"
    """How the rate grows with the global batch: square root (good up to ~2048), linear,
    or not at all."""
    weight_decay: float = Field(default=1e-2, ge=0)
    """AdamW weight decay."""
    head_lr_scale: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    """The supervised heads learn at this multiple of the learning rate (the backbone at
    the rate itself). The heads start from scratch in stage 2 on a representation already
    trained: at the backbone's rate, an ordinal head on the ``composition`` cohort (200
    steps of 32 donors) stayed at its chance loss (held-out Spearman 0.62 and 0.00 on
    seeds 0 and 2); fitted offline on the same views' z and composition it reached 0.59 at
    1x, 0.82 at 3x and 0.86 at 10x, and trained at 10x, 0.89 and 0.85 (``realistic``,
    seed 0: 0.96, was 0.93; benchmarks/README.md, "Supervised heads")."""
    warmup_epochs: int = Field(default=2, ge=0)
    """Linear warm-up at the start of each stage; cosine decay to zero afterwards."""


class TrainConfig(StageConfig):
    """A SampleCLR training run: model, objective, data, schedule, fault tolerance."""

    preset: Literal["auto", "small", "large"] = "auto"
    """Model size: the paper's small model below 200 donors and large above (auto)."""
    model: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the preset's ModelConfig fields (e.g. ``n_heads: 4``)."""
    tasks: list[TaskConfig] = Field(default_factory=list)
    """Supervised tasks for stage 2; none trains the contrastive stage only."""
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    """Bags per worker batch, cells per view, seed."""
    loss: LossConfig = Field(default_factory=default_loss_config)
    """The self-supervised objective and its settings, chosen by ``kind``."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimiser and schedule."""
    epochs: int = Field(default=40, ge=1, strict=True)  # `true` is no number of epochs
    """Epochs of stage 1 (contrastive): 40, the length the other defaults were chosen at
    (benchmarks/README.md, "Every scenario at 40 epochs")."""
    supervised_epochs: int = Field(default=10, ge=0, strict=True)
    """Epochs of stage 2 (contrastive + supervised); skipped without tasks."""
    supervised_min_steps: int = Field(default=200, ge=0, strict=True)
    """Fewest optimiser steps of stage 2: on a small cohort it runs more than
    ``supervised_epochs`` epochs to reach them. Measured (``realistic`` cohort, 128
    training donors, 4 steps an epoch): 10 epochs (40 steps) left the ordinal head
    predicting one class for every held-out donor, 40 epochs (160 steps) gave held-out
    Spearman 0.94 (benchmarks/README.md, "Supervised heads")."""
    freeze_epochs: int = Field(default=3, ge=0, strict=True)
    """First epochs of stage 2 that train only the supervised heads."""
    patience: int | None = Field(default=None, ge=1)
    """Stop a stage after this many epochs without a better validation loss; None runs
    every epoch. Either way a stage ends on its best validation weights. Off by default:
    X-CLR can sit on a plateau for its first epochs: at 10, 5 of the benchmark's 35 runs
    at the defaults (40 epochs) would have stopped early, 3 of them on weights from their
    first 6 epochs, near the collapsed loss (benchmarks/README.md, "The defaults as
    `train` runs them")."""
    standardize: Literal["auto", "batch", "batch_cell_type", "none"] = "auto"
    """Cell features as the model sees them: ``"batch"`` standardises each feature within
    the donor's technical batch (the store's statistics from ``ingest --batch-key``),
    ``"batch_cell_type"`` maps each cell with the shrunk location and scale of its (batch,
    cell type) pair onto its cell type's over the cohort (ComBat-like, per cell type; the
    store's ``batch_type_scale``/``batch_type_offset`` from ``ingest --batch-key`` with
    ``cell_type`` codes; ``sampleclr_scale/store/type_batches.py``), ``"none"`` keeps the
    stored features, ``"auto"`` is ``"batch_cell_type"`` when the store has those
    statistics and ``"none"`` otherwise. Embedding applies the same. Per-batch
    standardisation rescales each site by statistics that its donors' biology and
    composition also set, which cost batch mixing and held-out scores on the mixed
    scenario; the per-(batch, cell type) correction removes per-type site shifts and gains
    (benchmarks/README.md, "Quality")."""
    composition_channel: Annotated[float, Field(ge=0.0)] | Literal["auto"] = "auto"
    """Weight of the batch-aware composition channel that ``embed`` appends to every
    donor embedding: the CLR of the donor's cell-type counts, shrunk toward its batch's
    mean by the noise of counting its cells (empirical Bayes: a donor of few cells keeps
    little of its rare types' log-ratios), centred per technical batch when the store has
    batches, scaled to root mean square norm 1, next to the learned vector
    (``learned_block``; ``sampleclr_scale/store/composition.py``). Balanced views keep
    composition out of the learned vector (so it cannot be a donor's fingerprint in
    training); the channel puts it back, batch-aware. 0 leaves the learned vector alone; a
    store without ``cell_type`` codes gets no channel (embed warns). ``"auto"`` (the
    default) estimates the weight when training ends, from 0.5 to 8, as the one by which
    the embedding of the training donors best follows the loss's prior over each donor's
    nearest training donors (a least-squares fit of the prior's similarities on the two
    blocks' inner products, the learned block's coefficient weighed by its split-half
    reliability over two disjoint halves of every training donor's cells;
    ``sampleclr_scale/store/channel_weight.py``; 1.75 without a prior): a cohort whose
    severity lives in composition only wants it large (the fit: 2.5-8, its learned block
    mostly the cells drawn), one whose learned block already follows the prior wants it
    small (0.5-1.7). Over three draws of each of the quality benchmark's seven scenarios
    (40 epochs, five seeds each, all and held-out donors) the worst margin over the best
    baseline, mean over the draws, was -0.008 with the fit alone, against -0.027 at the
    best fixed weight, 1.75; the reliability raised the worst scenario's (``composition``)
    from -0.006 / -0.007 to +0.000 / -0.000, and the channel's shrinkage to +0.022 /
    +0.006 over five draws (benchmarks/README.md, "Three draws of every cohort", "The
    learned block's split-half reliability", "Each donor's composition shrunk by its
    counting noise"). The weight is saved in
    ``model.pt`` and logged. With a channel, the supervised
    heads read the donor's composition beside the learned vector, as the CLR centred per
    batch, neither weighted nor shrunk: they weigh each type themselves
    (``ModelConfig.head_composition``)."""
    learned_block: Literal["auto", "unit", "standardised"] = "auto"
    """How ``embed`` scales the learned vector next to the composition channel: ``"unit"``
    as ``z / |z|``; ``"standardised"`` as ``(z / |z| - m) / s``, with ``m`` the mean of the
    training donors' unit vectors and ``s`` their root mean square distance from it
    (computed when training ends and saved in the model, so every store the model embeds,
    a query of one donor too, gets the same map; ``sampleclr_scale/train/reference.py``);
    ``"auto"`` is ``"standardised"`` for a loss with a prior (``loss.prior``) and
    ``"unit"`` otherwise. The prior packs the donors' unit vectors into a narrow cone
    (mean cosine distance 0.07-0.11 on the ``shape`` cohort, 0.99 without it), next to
    which the channel would outweigh them several-fold; standardised, both blocks have
    root mean square norm 1. Without a prior, unit vectors are already spread and
    standardising them cost ``composition`` 0.07 (benchmarks/README.md, "The defaults as
    `train` runs them"). No effect without a channel."""
    batch_adversary: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    """Weight of a batch adversary's loss (domain-adversarial training, Ganin & Lempitsky
    2015): a classifier learns each donor's technical batch from its representation while
    the reversed gradient teaches the encoder to hide it
    (``sampleclr_scale/model/adversary.py``); needs a store ingested with ``--batch-key``.
    0 (the default) trains without one: on top of the per-(batch, cell type) correction
    and the batch-centred channel (which mix the sites) it changed no score beyond the
    seeds' spread, and alone (weight 1 or 5, no correction) it left the sites unmixed
    (benchmarks/README.md, "A batch adversary")."""
    workers: int = Field(default=2, ge=1, strict=True)
    """Ray Train workers (one process, and one GPU with use_gpu, each)."""
    use_gpu: bool = False
    """Train on GPUs (NCCL) instead of CPUs (gloo)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Arithmetic of the model's forward and backward passes: ``"bf16"`` runs the model under
    bfloat16 autocast (weights, optimiser state and the losses stay float32), ``"fp32"`` in
    float32, ``"auto"`` is bf16 on CUDA and fp32 on CPU."""
    compile: bool = False
    """Compile the model with ``torch.compile``: faster steps on a GPU after a compilation
    of a minute or so at the start of each stage (and when the backbone is unfrozen)."""
    placement: Literal["PACK", "SPREAD"] = "PACK"
    """How Ray places the workers: PACK fills a node first, SPREAD puts them on different
    nodes (one worker per node on a multi-node cluster)."""
    storage_path: str | None = None
    """Where Ray Train keeps the checkpoints: a local path or a URI (``s3://``, ``gs://``,
    ``file://``); default ``RUN/ray``. Multi-node runs need shared storage here."""
    checkpoint_every: int = Field(default=0, ge=0)
    """Also checkpoint every this many steps inside an epoch (0: at epoch ends only)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Checkpoints kept on storage."""
    max_failures: int = Field(default=1, ge=-1)
    """Worker failures recovered from the latest checkpoint (-1: no limit)."""
    log_every: int = Field(default=10, ge=1)
    """Steps between progress lines."""
    seed: int = 0
    """Seed of the model initialisation (the loader has its own)."""
    fail_at_step: int | None = Field(default=None, ge=0)
    """Fault injection for testing recovery: the last worker raises once at this global
    step (recorded in the run directory so the restarted run goes on)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        columns = [t.column for t in self.tasks]
        if len(set(columns)) != len(columns):
            raise ValueError(f"task columns must be unique: {columns}")
        for key in ("input_dim", "tasks"):
            if key in self.model:
                raise ValueError(f"model.{key} is set from the store and the tasks")
        self._check_model()
        if self.global_batch < 2:
            raise ValueError(
                f"a global batch of {self.global_batch} donor (workers {self.workers} x "
                f"loader.batch_size {self.worker_batch}) has no other donors to contrast "
                "with, so its loss is 0 and nothing is learnt: set loader.batch_size or "
                "workers so that workers x loader.batch_size is at least 2")
        return self

    def _check_model(self) -> None:
        """Validate ``model`` against every preset the run may take (the store decides
        ``auto``), so that a bad key fails with the config, not when the run starts."""
        from sampleclr_scale.model.config import ModelConfig

        for preset in ("small", "large") if self.preset == "auto" else (self.preset,):
            try:
                ModelConfig.preset(preset, input_dim=1, **self.model)
            except ValidationError as err:
                raise ValueError(f"model (preset {preset}): {describe_errors(err)}") from None

    @property
    def worker_batch(self) -> int:
        """Donors per batch on each worker (:meth:`LoaderConfig.process_batch`)."""
        return self.loader.process_batch(self.workers)

    @property
    def global_batch(self) -> int:
        """Donors per optimisation step over all workers."""
        return self.workers * self.worker_batch

    @property
    def channel_on(self) -> bool:
        """Whether ``embed`` appends the composition channel (``composition_channel``
        ``"auto"`` or above 0; a store without ``cell_type`` codes still gets none)."""
        return self.composition_channel == "auto" or self.composition_channel > 0

    @property
    def learning_rate(self) -> float:
        """``optim.lr`` scaled from the reference batch to the global batch."""
        ratio = self.global_batch / self.optim.reference_batch
        factor = {"sqrt": ratio**0.5, "linear": ratio, "none": 1.0}[self.optim.lr_scaling]
        return self.optim.lr * factor
