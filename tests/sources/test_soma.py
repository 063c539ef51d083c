"""The SOMA source: a damaged experiment is named, with the fix, instead of a traceback."""

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
