"""Issue 24: the kNN graph's queries sharded over gloo ranks (each rank a contiguous slice,
all-gathered) give every rank the single-process graph, for an uneven split too."""
import numpy as np
import pytest
import torch.distributed

from dpface.cluster.knn import check_embeddings, knn_graph
from tests.helpers import run_distributed


def pool(n=203, d=16):
    return check_embeddings(np.random.default_rng(5).standard_normal((n, d)))


def ranks_graph(rank: int, world: int) -> dict:
    out = {"searched": []}
    for index in ("flat", "ivf"):
        ids, sims = knn_graph(pool(), 7, index, nprobe=4, group=torch.distributed.group.WORLD,
                              progress=lambda done, total, s: out["searched"].append(total))
        out[index] = (ids, sims)
    return out


@pytest.mark.multiproc
def test_sharded_queries_equal_one_process(tmp_path):
    results = run_distributed(ranks_graph, 3, tmp_path)
    assert [r["searched"] for r in results] == [[67, 67], [68, 68], [68, 68]]  # each rank its slice
    for index in ("flat", "ivf"):
        ids, sims = knn_graph(pool(), 7, index, nprobe=4)
        for r in results:
            assert np.array_equal(r[index][0], ids)
            np.testing.assert_allclose(r[index][1], sims, atol=1e-6)
