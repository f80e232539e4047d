"""dpface.distributed.partition, and class-sharded state that reshards: head rows (see
test_sharding.py) and centre-loss centres, saved at world 2 and loaded at 1 and 3."""
import pytest
import torch

from dpface.distributed.partition import check_cover, class_range, gather_rows
from dpface.engine.checkpoint import reshard_aux_losses
from dpface.losses import center as center_mod
from dpface.losses.center import CenterLoss

C, D = 7, 3


def test_gather_rows_any_range():
    full = torch.arange(C * D, dtype=torch.float32).view(C, D)
    for w in (1, 2, 3, 7):
        blocks = [(*class_range(C, w, r), full[slice(*class_range(C, w, r))]) for r in range(w)]
        check_cover([(lo, hi) for lo, hi, _ in blocks], C)
        for a in range(C):
            for z in range(a + 1, C + 1):
                assert torch.equal(gather_rows(blocks, a, z), full[a:z])


def test_check_cover_errors():
    with pytest.raises(ValueError, match=r"classes \[5, 7\) are in no block"):
        check_cover([(0, 3), (3, 5)], C)
    with pytest.raises(ValueError, match="do not tile"):
        check_cover([(0, 4), (3, 7)], C)
    with pytest.raises(ValueError, match="do not tile"):
        check_cover([(0, 3), (4, 7)], C)


def centre_loss(monkeypatch, rank, world):
    # The constructor takes rank and world from the process group; stand in for one.
    monkeypatch.setattr(center_mod, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(center_mod, "get_world_size", lambda group=None: world)
    return CenterLoss(C, D)


def test_centres_reshard_from_world_2_to_1_and_3(monkeypatch):
    ref = torch.randn(C, D, generator=torch.Generator().manual_seed(0))
    saved = []
    for r in range(2):
        m = centre_loss(monkeypatch, r, 2)
        with torch.no_grad():
            m.centers.copy_(ref[m.class_start:m.class_end])
        saved.append(torch.nn.ModuleList([m]).state_dict())  # as the trainer saves aux losses
    for world in (1, 3):
        got = []
        for r in range(world):
            aux = torch.nn.ModuleList([centre_loss(monkeypatch, r, world)])
            reshard_aux_losses(aux, saved)
            got.append(aux[0].centers)
        assert torch.equal(torch.cat(got), ref)
    # same world size: a plain load; another one without resharding says what to use
    aux = torch.nn.ModuleList([centre_loss(monkeypatch, 1, 2)])
    aux.load_state_dict(saved[1])
    assert torch.equal(aux[0].centers, ref[4:])
    with pytest.raises(ValueError, match="another world size: load every rank's state with load_sharded"):
        centre_loss(monkeypatch, 0, 3).load_state_dict({k[2:]: v for k, v in saved[0].items()})


def test_centres_reshard_errors(monkeypatch):
    saved = [centre_loss(monkeypatch, r, 2).state_dict() for r in range(2)]
    m = centre_loss(monkeypatch, 0, 1)
    with pytest.raises(ValueError, match=r"classes \[4, 7\) are in no block"):
        m.load_sharded(saved[:1])
    other = CenterLoss(C + 1, D)
    with pytest.raises(ValueError, match="for 7 classes, this run has 8"):
        other.load_sharded(saved)
    with pytest.raises(ValueError, match="no center loss state"):
        m.load_sharded([{}, {}])
