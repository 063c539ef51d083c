"""The SOMA source: a damaged experiment is named, with the fix, instead of a traceback."""

import contextlib
import shutil
from pathlib import Path

import pytest

from sampleclr_scale.errors import InputError
from sampleclr_scale.ingest.stage import ingest
from tests.conftest import ingest_config


@pytest.mark.parametrize("array, features", [
    ("ms/RNA/obsm/scvi", "obsm:scvi"),
    ("ms/RNA/X/raw", "pca:4"),
])
def test_ingest_of_an_experiment_with_a_fragment_deleted_names_the_array(
        soma_uri, tmp_path, array, features):
    copy = tmp_path / "exp"
    shutil.copytree(soma_uri, copy)
    fragments = sorted((copy / array / "__fragments").iterdir())
    shutil.rmtree(fragments[0])  # its commit file stays: TileDB expects the fragment
    with pytest.raises(InputError, match=f"cannot read .* of {copy}") as err:
        ingest(ingest_config(str(copy), tmp_path / "bags.zarr", features=features))
    assert "damaged or incomplete" in err.value.fix
    assert not Path(tmp_path / "bags.zarr").exists()


def test_cells_missing_from_a_source_are_dropped_with_a_warning(soma_uri, tmp_path, caplog):
    # the fragment and its commit file gone: TileDB no longer knows of it, the cells it
    # held read as NaN, and ingest drops them loudly, not at info level
    copy = tmp_path / "exp"
    shutil.copytree(soma_uri, copy)
    array = copy / "ms/RNA/obsm/scvi"
    fragments = sorted((array / "__fragments").iterdir())
    shutil.rmtree(fragments[0])
    for commit in (array / "__commits").iterdir():
        if commit.name.startswith(fragments[0].name):
            commit.unlink()
    # every cell gone is refused too (InputError), after the warning
    with (caplog.at_level("WARNING", logger="sampleclr_scale.ingest.stage"),
          contextlib.suppress(InputError)):
        ingest(ingest_config(str(copy), tmp_path / "bags.zarr"))
    assert any("not finite" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
