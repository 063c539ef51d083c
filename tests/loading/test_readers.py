"""The memory-mapped reader (issue #14): the same batches as the Zarr path, byte for byte,
and the same refusal of a store whose files are not what its manifest lists.

The stores are real ones, ingested from the session's SOMA cohort with small chunks so that
donors cross chunk boundaries: float32 in chunks of 64 rows (2 KB, not whole pages: the
``chunks`` layout) and float16 in chunks of 512 rows (8 KB: the ``flat`` layout), both
with technical batches for standardisation.
"""

from __future__ import annotations

import ctypes
import os
import shutil

import numpy as np
import pytest
import torch
import zarr

from sampleclr_scale.config import LoaderConfig
from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.stage import ingest
from sampleclr_scale.loading import mapped, readers
from sampleclr_scale.loading.loader import DonorBagDataset, make_loader
from sampleclr_scale.loading.mapped import ChunkCache, MmapReader, mmap_layout
from sampleclr_scale.loading.readers import open_reader
from sampleclr_scale.loading.rows import ZarrReader
from sampleclr_scale.store.bag_store import BagStore
from sampleclr_scale.store.manifest import write_manifest
from tests.conftest import ingest_config


def _ingest(soma_uri, tmp_path_factory, name: str, **overrides) -> str:
    out = tmp_path_factory.mktemp(name) / "bags.zarr"
    ingest(ingest_config(soma_uri, out, batch_key=["dataset_id"], **overrides))
    return str(out)


@pytest.fixture(scope="module")
def f32_store(soma_uri, tmp_path_factory) -> str:
    """float32 features in chunks of 64 rows (2 KB: mapped chunk by chunk)."""
    return _ingest(soma_uri, tmp_path_factory, "f32", chunk_rows=64)


@pytest.fixture(scope="module")
def f16_store(soma_uri, tmp_path_factory) -> str:
    """float16 features in chunks of 512 rows (8 KB: mapped flat)."""
    return _ingest(soma_uri, tmp_path_factory, "f16", chunk_rows=512, dtype="float16")


def _epoch(path: str, config: LoaderConfig, epoch: int = 1, **kwargs) -> list:
    dataset = DonorBagDataset(path, config, tasks={"severity": "ordinal", "age": "regression"},
                              **kwargs)
    dataset.set_epoch(epoch)
    return list(make_loader(dataset))


def _assert_same(first: list, second: list) -> None:
    assert len(first) == len(second) > 0
    for x, y in zip(first, second, strict=True):
        assert x.cells.dtype == y.cells.dtype == torch.float32
        assert x.cells.numpy().tobytes() == y.cells.numpy().tobytes()
        assert torch.equal(x.mask, y.mask) and torch.equal(x.donor, y.donor)
        assert x.labels.keys() == y.labels.keys()
        for key in x.labels:
            assert x.labels[key].numpy().tobytes() == y.labels[key].numpy().tobytes()
        assert (x.batch is None) == (y.batch is None)
        assert x.batch is None or torch.equal(x.batch, y.batch)
        assert (x.epoch, x.step) == (y.epoch, y.step)


def test_the_test_stores_cross_chunk_boundaries(f32_store, f16_store):
    for path, rows, layout in ((f32_store, 64, "chunks"), (f16_store, 512, "flat")):
        store = BagStore(path)
        first, last = store.donor_ptr[:-1], store.donor_ptr[1:] - 1
        assert (first // rows != last // rows).sum() >= 5
        reader = open_reader(store, store.features)
        assert isinstance(reader, MmapReader) and reader.layout == layout


@pytest.mark.parametrize("store_name", ["f32_store", "f16_store"])
@pytest.mark.parametrize("balance", [None, "cell_type"])
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("views", [(30, None), (60, 20)])
def test_mmap_and_zarr_give_byte_identical_batches(request, store_name, balance, standardize,
                                                   views):
    path = request.getfixturevalue(store_name)
    m, smallest = views
    config = LoaderConfig(batch_size=3, cells_per_view=m, min_cells_per_view=smallest,
                          balance=balance, seed=4)
    for rank, world in ((0, 1), (1, 2)):
        zarr_batches = _epoch(path, config.model_copy(update={"reader": "zarr"}),
                              standardize=standardize, rank=rank, world_size=world)
        mmap_batches = _epoch(path, config.model_copy(update={"reader": "mmap"}),
                              standardize=standardize, rank=rank, world_size=world)
        _assert_same(zarr_batches, mmap_batches)
        auto = _epoch(path, config, standardize=standardize, rank=rank, world_size=world)
        _assert_same(zarr_batches, auto)
    if smallest is not None:
        assert not all(bool(b.mask.all()) for b in zarr_batches)  # padded views were tested


def test_both_mapped_layouts_and_workers_give_the_same_batches(f16_store, monkeypatch):
    config = LoaderConfig(batch_size=4, cells_per_view=40, reader="mmap", seed=1)
    flat = _epoch(f16_store, config, standardize=True)
    monkeypatch.setattr(mapped, "_flat_possible", lambda *_: False)
    chunks = _epoch(f16_store, config, standardize=True)
    _assert_same(flat, chunks)
    workers = _epoch(f16_store, config.model_copy(update={"num_workers": 2}), standardize=True)
    _assert_same(flat, workers)


def test_standardised_views_are_the_stores_per_donor_arithmetic(f32_store):
    store = BagStore(f32_store)
    mean, std = store.batch_stats
    config = LoaderConfig(batch_size=4, cells_per_view=50, min_cells_per_view=30, seed=2)
    for raw, batch in zip(_epoch(f32_store, config), _epoch(f32_store, config,
                                                            standardize=True), strict=True):
        for i, donor in enumerate(batch.donor.tolist()):
            b = int(store.donor_batch[donor])
            mask = raw.mask[i].numpy()
            expected = store.standardize(raw.cells[i].numpy()[mask], b)
            assert expected.tobytes() == batch.cells[i].numpy()[mask].tobytes()
            assert (batch.cells[i].numpy()[~mask] == 0).all()
        assert not np.allclose(mean, 0) and not np.allclose(std, 1)


# --- readers ---------------------------------------------------------------------------


def _row_patterns(n: int, chunk: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row positions the loader asks for: windows inside and across chunks, a window that
    wraps around its donor, scattered rows in one or several chunks, repeats, one row."""
    start = chunk - 7
    window = np.arange(start, start + 3 * chunk)
    wrapped = np.concatenate([np.arange(n - 20, n), np.arange(0, 30)])
    scattered = rng.integers(0, n, size=500)
    in_one = chunk + rng.integers(0, chunk, size=100)
    repeats = np.repeat(rng.integers(0, n, size=10), 7)
    return [window, wrapped, scattered, in_one, repeats, np.array([n - 1]),
            np.arange(0, n, 3), np.zeros(0, dtype=np.int64)]


@pytest.mark.parametrize("kind", ["zarr", "flat", "chunks", "cache", "cache_small"])
def test_readers_return_the_rows_asked_for(f16_store, kind):
    store = BagStore(f16_store)
    features = store.features
    reference = features[:]
    location, sizes = store.location, store.manifest.sizes
    reader = {
        "zarr": lambda: ZarrReader(features),
        "flat": lambda: MmapReader(features, location.path, location.uri, sizes, flat=True),
        "chunks": lambda: MmapReader(features, location.path, location.uri, sizes,
                                     flat=False, max_bytes=3 * 512 * 8 * 2),  # 3 maps
        "cache": lambda: ChunkCache(features),  # small enough to be kept whole
        "cache_small": lambda: ChunkCache(features, max_bytes=1),  # one chunk kept
    }[kind]()
    rng = np.random.default_rng(0)
    for rows in _row_patterns(store.n_cells, 512, rng):
        rows = rows.astype(np.int64)
        got = reader.read(rows)
        assert got.dtype == np.float16 and got.tobytes() == reference[rows].tobytes()
        out = np.full((len(rows), store.dim), np.nan, dtype=np.float32)
        reader.read_into(rows, out)
        assert out.tobytes() == reference[rows].astype(np.float32).tobytes()
    assert reader[5:700].tobytes() == reference[5:700].tobytes()
    if kind == "chunks":
        assert len(reader._chunks) <= 3
    if kind.startswith("cache"):
        assert reader.whole == (kind == "cache")


def test_auto_maps_a_local_uncompressed_store_and_keeps_zarr_for_the_rest(f32_store, tmp_path):
    store = BagStore(f32_store)
    assert open_reader(store, store.features, "auto").kind == "mmap"
    assert open_reader(store, store.features, "zarr").kind == "zarr"
    codes = store.codes("cell_type")  # zstd-compressed by ingest
    assert "ZstdCodec" in mmap_layout(codes)
    for mode in ("auto", "mmap", "zarr"):
        assert open_reader(store, codes, mode, small=True).kind == "cache"
    # the same store with compressed features: Zarr, and an error when mmap is demanded
    copy = tmp_path / "compressed.zarr"
    shutil.copytree(f32_store, copy)
    data = zarr.open_array(str(copy / "features"), mode="r")[:]
    group = zarr.open_group(str(copy), mode="r+")
    del group["features"]
    group.create_array("features", data=data, chunks=(64, data.shape[1]),
                       compressors=zarr.codecs.ZstdCodec(level=1))
    write_manifest(copy)
    compressed = BagStore(copy)
    assert open_reader(compressed, compressed.features, "auto").kind == "zarr"
    with pytest.raises(InputError, match=r"loader\.reader: mmap cannot read .*ZstdCodec"):
        open_reader(compressed, compressed.features, "mmap")
    config = LoaderConfig(batch_size=3, cells_per_view=30, seed=3)
    _assert_same(_epoch(f32_store, config), _epoch(str(copy), config))
    with pytest.raises(InputError, match=r"loader\.reader: mmap cannot read"):
        DonorBagDataset(str(copy), config.model_copy(update={"reader": "mmap"}))


def test_layouts_mmap_cannot_read_are_named(tmp_path):
    data = np.arange(4096 * 4, dtype=np.float32).reshape(4096, 4)
    cases = {
        "big-endian": dict(chunks=(1024, 4), compressors=None,
                           serializer=zarr.codecs.BytesCodec(endian="big")),
        "ShardingCodec": dict(chunks=(256, 4), shards=(1024, 4), compressors=None),
        "split the rows": dict(chunks=(1024, 2), compressors=None),
        "not the bytes codec alone": dict(chunks=(1024, 4)),  # zstd by default
    }
    for reason, settings in cases.items():
        array = zarr.create_array(str(tmp_path / reason.replace(" ", "_")), data=data,
                                  **settings)
        assert reason in mmap_layout(array)
    plain = zarr.create_array(str(tmp_path / "plain"), data=data, chunks=(1024, 4),
                              compressors=None)
    assert mmap_layout(plain) is None


@pytest.mark.parametrize("flat", [True, False])
def test_chunks_never_written_read_as_the_fill_value(tmp_path, flat):
    data = np.ones((4096, 4), dtype=np.float32)
    data[1024:2048] = 0.0  # a whole chunk of fill values: Zarr does not write it
    array = zarr.create_array(str(tmp_path / "a"), data=data, chunks=(1024, 4),
                              compressors=None, fill_value=0.0)
    assert not (tmp_path / "a" / "c" / "1" / "0").exists()
    reader = MmapReader(array, str(tmp_path / "a"), str(tmp_path / "a"), {}, flat=flat)
    rows = np.arange(900, 2200)
    assert reader.read(rows).tobytes() == array[:][rows].tobytes()


@pytest.mark.parametrize("layout", ["flat", "chunks"])
@pytest.mark.parametrize("damage", ["missing", "short"])
def test_a_missing_or_short_chunk_file_is_refused_by_name(request, tmp_path, layout, damage):
    # flat: the float16 store (8 KB chunks), every chunk mapped when the reader opens;
    # chunks: the float32 store (2 KB chunks), each chunk mapped when it is first read
    source = request.getfixturevalue("f16_store" if layout == "flat" else "f32_store")
    damaged = tmp_path / "bags.zarr"
    shutil.copytree(source, damaged)
    store = BagStore(damaged)  # the open check passes; the damage comes after it
    key = "features/c/3/0"
    chunk = damaged / key
    size = chunk.stat().st_size
    if damage == "missing":
        chunk.unlink()
        problem = "missing, found on read"
    else:
        chunk.write_bytes(chunk.read_bytes()[:100])
        problem = f"100 bytes, {size} in the manifest, found on read"
    message = rf"bag store .* is damaged: .*{key} \({problem}\)"
    location, sizes = store.location, store.manifest.sizes
    if layout == "flat":
        with pytest.raises(InputError, match=message):
            MmapReader(store.features, location.path, location.uri, sizes, flat=True)
    else:
        reader = MmapReader(store.features, location.path, location.uri, sizes, flat=False)
        reader.read(np.arange(0, 3 * 64))  # the other chunks are read
        with pytest.raises(InputError, match=message):
            reader.read(np.arange(3 * 64 + 5, 3 * 64 + 9))
    # the loader, whose store open check sees it first, refuses it by name as well
    with pytest.raises(InputError, match=key):
        _epoch(str(damaged), LoaderConfig(batch_size=3, cells_per_view=30, reader="mmap"))


def test_bench_loader_times_every_setting_against_the_in_memory_gather(f16_store, tmp_path,
                                                                       capsys):
    from sampleclr_scale.cli import main

    out = tmp_path / "loader.json"
    assert main(["bench", "loader", "--store", f16_store, "--batch-size", "3",
                 "--cells-per-view", "30", "--seconds", "0.2", "--workers", "0",
                 "--json", str(out)]) in (0, None)
    import json

    figures = json.loads(out.read_text())
    for kind in ("balanced", "uniform"):
        results = figures[kind]
        assert results["in_memory_gather"]["cells_per_s"] > 0
        for reader in ("zarr", "mmap"):
            setting = results[f"{reader}_0_workers"]
            assert setting["seconds"] >= 0.2 and setting["batches"] > 0
            assert setting["slowdown_vs_in_memory"] == pytest.approx(
                results["in_memory_gather"]["cells_per_s"] / setting["cells_per_s"], rel=0.01)
        assert results["zarr_direct_reads"]["zarr_python"]["cells_per_s"] > 0
    assert isinstance(figures["annbatch"], (str, dict))
    table = capsys.readouterr().out
    assert "mmap_0_workers" in table and "in-memory / this" in table


def test_a_remote_store_is_read_through_zarr_with_the_same_batches(f32_store, bucket):
    from tests.storage.test_storage import upload_store

    uri = f"{bucket}/f32/bags.zarr"
    upload_store(f32_store, uri)
    remote = BagStore(uri)
    assert "not on a local file system" in readers.mmap_problem(remote, remote.features)
    assert open_reader(remote, remote.features).kind == "zarr"
    with pytest.raises(InputError, match="not on a local file system"):
        DonorBagDataset(uri, LoaderConfig(batch_size=3, cells_per_view=30, reader="mmap"))
    config = LoaderConfig(batch_size=3, cells_per_view=40, seed=6)  # balanced, 16 threads
    _assert_same(_epoch(f32_store, config, standardize=True),
                 _epoch(uri, config, standardize=True))


def test_batch_buffers_are_reused_only_once_nothing_refers_to_them(f32_store):
    config = LoaderConfig(batch_size=1, cells_per_view=30, seed=7, prefetch=2)
    dataset = DonorBagDataset(f32_store, config)
    kept = list(make_loader(dataset))  # every batch held: every buffer its own
    assert len({b.cells.data_ptr() for b in kept}) == len(kept) > 8
    expected = [b.cells.clone() for b in kept]
    views = [b.cells[:, 0] for b in kept]  # views keep a buffer from reuse as well
    held = {v.data_ptr() for v in views}
    del kept
    for batch, want in zip(make_loader(dataset), expected, strict=True):
        assert torch.equal(batch.cells, want) and batch.cells.data_ptr() not in held
    assert all(torch.equal(v, w[:, 0]) for v, w in zip(views, expected, strict=True))
    del views, batch
    seen = {b.cells.data_ptr() for b in make_loader(dataset)}  # each dropped at once
    assert len(seen) <= config.prefetch + 4


def test_kept_readers_are_made_once_per_key_and_dropped_least_recently_used():
    from types import SimpleNamespace

    from sampleclr_scale.loading.readers import KeptReaders

    kept, made = KeptReaders(capacity=2), []

    def store(uri):
        return SimpleNamespace(location=SimpleNamespace(uri=uri), fingerprint="f")

    def get(uri):
        return kept.get(store(uri), SimpleNamespace(path="features"), "mmap",
                        lambda: made.append(uri) or object())

    first = get("a")
    assert get("a") is first and made == ["a"]
    get("b")
    get("a")  # a is now the most recently used
    get("c")  # drops b
    get("a")
    get("b")
    assert made == ["a", "b", "c", "b"]
    kept.clear()
    get("a")
    assert made[-1] == "a"


def _mapped_kb(start: int, length: int) -> int:
    """KB of this process's resident set mapped at ``start .. start + length``
    (``/proc/self/smaps``)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):  # noqa: SIM115 - read whole, closed by the loop
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):  # a mapping's first line: lo-hi perms
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < start + length and hi > start
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux /proc")
def test_a_flat_map_releases_its_pages_as_it_reads(f16_store):
    store = BagStore(f16_store)
    reference = store.features[:]
    location = store.location
    reader = MmapReader(store.features, location.path, location.uri, store.manifest.sizes,
                        flat=True, release_bytes=1 << 62)
    anchor = ctypes.c_char.from_buffer(reader._reserved)
    base, length = ctypes.addressof(anchor), len(reader._reserved)
    del anchor
    rows = np.arange(store.n_cells)
    assert reader.read(rows).tobytes() == reference.tobytes()
    assert _mapped_kb(base, length) * 1024 >= 0.9 * reference.nbytes  # every page mapped
    reader.release_bytes = reference.nbytes  # the next read of every row releases them
    assert reader.read(rows).tobytes() == reference.tobytes()
    assert reader.releases == 1
    assert _mapped_kb(base, length) * 1024 <= 0.1 * reference.nbytes
    assert reader.read(rows[::7]).tobytes() == reference[::7].tobytes()  # faulted back in
