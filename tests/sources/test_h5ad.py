"""The h5ad source: an obsm entry it cannot read in row blocks is refused by name."""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sampleclr_scale.errors import InputError
from sampleclr_scale.sources.registry import open_source


@pytest.mark.parametrize("kind, value", [
    ("sparse", lambda n: sp.random(n, 4, density=0.5, format="csr", random_state=0)),
    ("dataframe", lambda n: pd.DataFrame(np.ones((n, 3)), columns=["a", "b", "c"],
                                         index=[f"c{i}" for i in range(n)])),
])
def test_a_non_dense_obsm_is_refused_with_the_fix(tmp_path, kind, value):
    n = 20
    adata = anndata.AnnData(np.ones((n, 5), dtype=np.float32),
                            obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]))
    adata.obs_names = adata.obs_names.astype(str)
    adata.obsm["emb"] = value(n)
    adata.obsm["dense"] = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    path = tmp_path / f"{kind}.h5ad"
    adata.write_h5ad(path)
    source = open_source(str(path))
    try:
        with pytest.raises(InputError, match=r"obsm 'emb' .* not a dense") as err:
            source.embedding_dim("emb")
        assert "np.asarray" in err.value.fix
        assert source.embedding_dim("dense") == 2
        np.testing.assert_array_equal(source.read_embedding("dense", np.array([1, 3])),
                                      [[2, 3], [6, 7]])
    finally:
        source.close()
