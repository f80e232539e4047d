"""Evaluation: 10-fold protocol, TAR@FAR/ROC/AUC, embedding extraction, .bin sets, 1:N."""
import io
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dpface.data.transforms import normalize
from dpface.eval import (
    auc,
    evaluate_pairs,
    evaluate_scores,
    extract_embeddings,
    identification_rates,
    kfold_accuracy,
    load_bin,
    pair_scores,
    rank1_identification,
    roc_curve,
    tar_at_far,
    template_embedding,
    write_bin,
)

# ----------------------------------------------------------------------------- 10-fold


def _hand_case():
    """20 pairs, fold k = pairs (2k: positive, 2k+1: negative).

    Positives score 0.9 except fold 0's (0.3); negatives 0.1 except fold 1's (0.7).
    Accept when score > t; candidates are midpoints of the training folds' unique scores.
    - test fold 0: train pos {.9×9}, neg {.7, .1×8} → t=.8 gives 18/18. Held out: pos .3
      rejected (wrong), neg .1 rejected (right) → 0.5.
    - test fold 1: train pos {.3, .9×8}, neg {.1×9} → t=.2 gives 18/18. Held out: pos .9
      accepted (right), neg .7 accepted (wrong) → 0.5.
    - test folds 2..9: train pos {.3, .9×8}, neg {.7, .1×8}: t=.2 → 9+8=17, t=.5 → 8+8=16,
      t=.8 → 8+9=17; tie between .2 and .8 → the higher, .8 (insightface's choice, see
      ``best_threshold``). Held out (.9, .1) → 1.0.
    Mean 0.9; deviations (-.4, -.4, +.1×8) → population std sqrt(.4/10) = 0.2.
    """
    scores = np.empty(20)
    issame = np.zeros(20, dtype=bool)
    scores[0::2], scores[1::2], issame[0::2] = 0.9, 0.1, True
    scores[0], scores[3] = 0.3, 0.7
    return scores, issame


def test_kfold_hand_computed():
    scores, issame = _hand_case()
    accs, thr = kfold_accuracy(scores, issame, num_folds=10)
    assert accs == [0.5, 0.5] + [1.0] * 8
    np.testing.assert_allclose(thr, [0.8, 0.2] + [0.8] * 8, atol=1e-12)
    res = evaluate_scores(scores, issame)
    assert res.accuracy == pytest.approx(0.9)
    assert res.accuracy_std == pytest.approx(0.2)


def test_kfold_explicit_folds_match_consecutive_split():
    scores, issame = _hand_case()
    perm = np.random.default_rng(0).permutation(20)
    folds = np.repeat(np.arange(10), 2)[perm]  # each pair keeps its fold id after shuffling
    accs, thr = kfold_accuracy(scores[perm], issame[perm], folds=folds)
    assert accs == [0.5, 0.5] + [1.0] * 8
    np.testing.assert_allclose(thr, [0.8, 0.2] + [0.8] * 8, atol=1e-12)


def test_kfold_separable_and_random():
    rng = np.random.default_rng(1)
    issame = np.repeat([True, False], 300)
    scores = np.where(issame, rng.uniform(0.5, 1.0, 600), rng.uniform(-1.0, 0.4, 600))
    accs, thr = kfold_accuracy(scores, issame)
    assert accs == [1.0] * 10
    assert all(0.4 < t < 0.5 for t in thr)

    # Random scores, labels independent of them: each held-out fold's threshold is chosen
    # without that fold's labels, so its correct count is Binomial(5000, 1/2). Hoeffding + a
    # union bound over 10 folds: P(any fold off by > 0.04) <= 10·2·exp(-2·5000·0.04²) ≈ 2e-6,
    # and the mean of the folds deviates no more than the worst fold.
    n = 50000
    s = rng.uniform(-1, 1, n)
    y = rng.random(n) < 0.5
    accs, _ = kfold_accuracy(s, y)
    assert abs(np.mean(accs) - 0.5) < 0.04


def test_kfold_errors():
    with pytest.raises(ValueError, match="3 scores but 2"):
        kfold_accuracy(np.zeros(3), np.array([True, False]))
    with pytest.raises(ValueError, match="cannot be split"):
        kfold_accuracy(np.zeros(5), np.ones(5, bool), num_folds=10)
    with pytest.raises(ValueError, match="folds must have shape"):
        kfold_accuracy(np.zeros(4), np.ones(4, bool), folds=np.zeros(3, int))


# ----------------------------------------------------------------------------- TAR@FAR, ROC


def _naive_tar_at_far(scores, issame, far):
    """Brute force over every possible threshold: the smallest t with FAR(t) <= far."""
    pos, neg = scores[issame], scores[~issame]
    if far * neg.size < 1 - 1e-9:
        return float("nan")
    for t in np.concatenate(([-np.inf], np.unique(scores))):  # ascending
        if np.mean(neg > t) <= far:
            return float(np.mean(pos > t))
    raise AssertionError("unreachable: t = max score has FAR 0")


def test_tar_at_far_matches_brute_force():
    rng = np.random.default_rng(2)
    issame = rng.random(2600) < 0.4
    # rounding creates many ties, the interesting case for threshold placement
    scores = np.round(np.where(issame, rng.normal(0.6, 0.2, 2600), rng.normal(0.1, 0.2, 2600)), 2)
    fars = (0.3, 1e-1, 1e-2, 1e-3, 1e-4)
    got = tar_at_far(scores, issame, fars)
    for far in fars:
        want = _naive_tar_at_far(scores, issame, far)
        if math.isnan(want):
            assert math.isnan(got[far]), far
        else:
            assert got[far] == pytest.approx(want), far
    assert (~issame).sum() < 10_000 and math.isnan(got[1e-4])  # too few negatives → NaN
    assert not math.isnan(got[1e-3])


def test_tar_at_far_small_exact():
    # negatives 0.1..1.0 (10 of them): FAR 0.1 allows 1 accepted → t = 2nd largest neg = 0.9
    neg = np.arange(1, 11) / 10
    pos = np.array([0.85, 0.9, 0.95, 1.2])
    s = np.concatenate([neg, pos])
    y = np.r_[np.zeros(10, bool), np.ones(4, bool)]
    assert tar_at_far(s, y, (0.1,))[0.1] == pytest.approx(0.5)  # 0.95 and 1.2 are > 0.9
    assert math.isnan(tar_at_far(s, y, (0.05,))[0.05])


def _mann_whitney_auc(scores, issame):
    pos, neg = scores[issame], scores[~issame]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def test_roc_auc_matches_mann_whitney():
    rng = np.random.default_rng(3)
    y = rng.random(700) < 0.5
    s = np.round(np.where(y, rng.normal(0.3, 0.3, 700), rng.normal(0.0, 0.3, 700)), 1)  # ties
    fpr, tpr, thr = roc_curve(s, y)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.all(np.diff(thr) < 0) and thr[-1] == -np.inf
    # each point is the rates of "score > threshold"
    for i in (0, len(thr) // 2, len(thr) - 1):
        assert fpr[i] == pytest.approx(np.mean(s[~y] > thr[i]))
        assert tpr[i] == pytest.approx(np.mean(s[y] > thr[i]))
    assert auc(fpr, tpr) == pytest.approx(_mann_whitney_auc(s, y), abs=1e-12)
    res = evaluate_scores(s, y)
    assert res.auc == pytest.approx(_mann_whitney_auc(s, y), abs=1e-12)
    json.dumps(res.as_dict(), allow_nan=False)  # loggable as strict JSON


# ----------------------------------------------------------------------------- embeddings


class _Tiny(torch.nn.Module):
    """Deterministic in eval mode (dropout) and not flip-invariant (a dense layer)."""

    def __init__(self, d=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = torch.nn.Linear(3 * 4 * 6, d)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(d, 3 * 4 * 6, generator=g))
            self.fc.bias.zero_()
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.fc(x.flatten(1)))


def _images(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 4, 6), dtype=torch.uint8, generator=g)


def test_extract_embeddings_flip_and_batching():
    model, x = _Tiny(), _images()
    model.train()
    model.drop.eval()  # a deliberately mixed state that must come back as it was
    emb = extract_embeddings(model, x, batch_size=3, flip=True)
    assert model.training and model.fc.training and not model.drop.training

    with torch.no_grad():
        w, b = model.fc.weight, model.fc.bias
        f = lambda im: normalize(im).flatten(1) @ w.T + b  # noqa: E731
        manual = f(x) + f(x.flip(-1))
        manual = manual / manual.norm(dim=1, keepdim=True)
    assert emb.dtype == torch.float32 and emb.shape == (7, 5) and emb.device.type == "cpu"
    torch.testing.assert_close(emb, manual, rtol=1e-5, atol=1e-6)

    no_flip = extract_embeddings(model, x, flip=False)
    torch.testing.assert_close(no_flip, f(x) / f(x).norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(no_flip, emb)

    nhwc = extract_embeddings(model, x.permute(0, 2, 3, 1).numpy(), batch_size=4)
    torch.testing.assert_close(nhwc, emb)


def test_extract_embeddings_validation():
    model = _Tiny()
    model.eval()
    with pytest.raises(TypeError, match="uint8"):
        extract_embeddings(model, _images().float())
    with pytest.raises(ValueError, match=r"\[N,3,H,W\]"):
        extract_embeddings(model, _images().permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"\[N,H,W,3\]"):
        extract_embeddings(model, _images().numpy())
    assert not model.training  # eval mode kept as it was


def test_mismatched_embedding_sizes():
    with pytest.raises(ValueError, match=r"D=8.*D=16"):
        pair_scores(torch.randn(4, 8), torch.randn(4, 16))
    with pytest.raises(ValueError, match="4 rows.*3"):
        pair_scores(torch.randn(4, 8), torch.randn(3, 8))
    a = torch.randn(6, 8)
    np.testing.assert_allclose(pair_scores(a, 2 * a), np.ones(6), rtol=1e-6)


def test_evaluate_pairs_end_to_end():
    model = _Tiny()
    a = _images(20, seed=1)
    b = a.clone()
    b[10:] = _images(10, seed=2)  # first 10 pairs identical images, last 10 unrelated
    issame = np.r_[np.ones(10, bool), np.zeros(10, bool)]
    res = evaluate_pairs(model, a, b, issame, batch_size=8, fars=(0.1,))
    assert res.accuracy == 1.0 and res.auc == 1.0 and res.tar_at_far[0.1] == 1.0
    assert len(res.fold_accuracies) == 10 and len(res.roc) == 3
    with pytest.raises(ValueError, match="20 image pairs but 3"):
        evaluate_pairs(model, a, b, issame[:3])


# ----------------------------------------------------------------------------- .bin sets


def _smooth_pairs(p=4, h=16, w=12):
    yy, xx = np.mgrid[0:h, 0:w]
    imgs = []
    for i in range(2 * p):
        im = np.stack([xx * 200 / w + 5 * i, yy * 255 / h, np.full_like(xx, 30 * i)], -1)
        imgs.append(im.astype(np.uint8))
    imgs = np.stack(imgs)
    return imgs[0::2], imgs[1::2], np.array([True, False, True, False][:p])


def test_bin_round_trip_png_and_jpeg(tmp_path):
    a, b, same = _smooth_pairs()
    path = tmp_path / "set.bin"
    write_bin(path, a, b, same, format="png")
    la, lb, ls = load_bin(path, image_size=(16, 12))
    assert ls.dtype == bool and ls.tolist() == same.tolist()
    np.testing.assert_array_equal(la, a)
    np.testing.assert_array_equal(lb, b)

    write_bin(path, torch.from_numpy(a).permute(0, 3, 1, 2), b, same, format="jpeg")
    ja, jb, _ = load_bin(path, image_size=(16, 12))
    assert np.abs(ja.astype(int) - a).mean() < 3 and np.abs(jb.astype(int) - b).mean() < 3

    ra, _, _ = load_bin(path, image_size=112)  # resized on load
    assert ra.shape == (4, 112, 112, 3) and ra.dtype == np.uint8
    assert not any(n.startswith(".tmp_") for n in os.listdir(tmp_path))


def test_bin_python2_style_pickle(tmp_path):
    # protocol 2 from Python 3 stores bytes via _codecs.encode, as re-saved public sets may
    a, b, same = _smooth_pairs(2)
    bins = []
    for pa, pb in zip(a, b):
        for im in (pa, pb):
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            bins.append(buf.getvalue())
    path = tmp_path / "py2.bin"
    path.write_bytes(pickle.dumps((bins, np.array(same)), protocol=2))
    la, lb, ls = load_bin(path, image_size=(16, 12))
    np.testing.assert_array_equal(la, a)
    assert ls.tolist() == [True, False]


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless stand-in for os.system


def test_bin_errors(tmp_path):
    a, b, same = _smooth_pairs()
    good = tmp_path / "good.bin"
    write_bin(good, a, b, same)
    bins, issame = pickle.loads(good.read_bytes())

    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_bin(tmp_path / "nope.bin")

    def dump(obj, name):
        p = tmp_path / name
        p.write_bytes(pickle.dumps(obj))
        return p

    corrupt = list(bins)
    corrupt[5] = b"\xff\xd8 definitely not a jpeg"
    with pytest.raises(ValueError, match=r"image 5 \(pair 2, side b\)"):
        load_bin(dump((corrupt, issame), "corrupt.bin"))

    notpickle = tmp_path / "text.bin"
    notpickle.write_bytes(b"hello, not a pickle")
    with pytest.raises(ValueError, match="not a readable .bin pickle"):
        load_bin(notpickle)
    with pytest.raises(ValueError, match=r"\(bins, issame_list\)"):
        load_bin(dump({"bins": bins}, "dict.bin"))
    with pytest.raises(ValueError, match="odd number of images"):
        load_bin(dump((bins[:-1], issame), "odd.bin"))
    with pytest.raises(ValueError, match="8 images make 4 pairs but issame_list has 3"):
        load_bin(dump((bins, issame[:3]), "short.bin"))
    with pytest.raises(ValueError, match="image 0: expected encoded image bytes"):
        load_bin(dump(([1] * 8, issame), "ints.bin"))
    with pytest.raises(ValueError, match="refusing to load global"):
        load_bin(dump((_Evil(), issame), "evil.bin"))


# ----------------------------------------------------------------------------- identification


def test_rank1_identification_constructed():
    e = torch.eye(4)
    gallery = torch.stack([e[0], e[1], e[2], e[2] + 0.1 * e[3]])  # identity 2 has two images
    g_labels = np.array([10, 11, 12, 12])
    # each probe is closest to its own identity: cos(probe0, e0) = 0.8/1 after normalising
    probes = torch.stack([e[0] + 0.75 * e[3], e[1] + 0.2 * e[0], e[2] + 0.3 * e[3]])
    p_labels = np.array([10, 11, 12])
    assert rank1_identification(gallery, g_labels, probes, p_labels) == 1.0

    # a distractor nearer to probe 0 than its true match (cos 0.8) steals rank 1
    thief = (e[0] + 0.75 * e[3]) + 0.05 * e[1]
    rates = identification_rates(gallery, g_labels, probes, p_labels,
                                 distractor_emb=thief[None], ranks=(1, 2))
    assert rates[1] == pytest.approx(2 / 3) and rates[2] == 1.0
    # a far distractor changes nothing; a tie (exact copy of the true match) counts against
    far = -e[0][None]
    assert rank1_identification(gallery, g_labels, probes, p_labels, far) == 1.0
    assert rank1_identification(gallery, g_labels, probes, p_labels, e[1][None] * 3) == pytest.approx(2 / 3)

    with pytest.raises(ValueError, match="not in the gallery"):
        rank1_identification(gallery, g_labels, probes, np.array([10, 11, 99]))


def test_identification_matches_sorting():
    rng = np.random.default_rng(4)
    g = rng.normal(size=(30, 8))
    gl = np.arange(30) % 12
    p = rng.normal(size=(25, 8))
    pl = rng.integers(0, 12, 25)
    d = rng.normal(size=(40, 8))
    got = identification_rates(g, gl, p, pl, d, ranks=(1, 3))
    # naive: rank the best same-identity entry among competitors by sorting all scores
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    allv = unit(np.vstack([g, d]))
    alll = np.r_[gl, np.full(40, -1)]
    ranks = []
    for v, lab in zip(unit(p), pl):
        sc = allv @ v
        true = sc[alll == lab].max()
        ranks.append(1 + np.sum((sc >= true) & (alll != lab)))
    ranks = np.array(ranks)
    assert got[1] == pytest.approx(np.mean(ranks <= 1))
    assert got[3] == pytest.approx(np.mean(ranks <= 3))


def test_template_embedding():
    x = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    mean = template_embedding(x)
    torch.testing.assert_close(mean, torch.tensor([1.0, 1.0]) / 2 ** 0.5)
    by_norm = template_embedding(x.numpy(), weights="norm")
    assert isinstance(by_norm, np.ndarray)
    np.testing.assert_allclose(by_norm, np.array([3.0, 1.0]) / 10 ** 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="non-negative"):
        template_embedding(x, weights=[1.0, -1.0])


def test_roc_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from dpface.eval import roc_plot

    fpr, tpr, _ = roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True]))
    roc_plot(fpr, tpr, tmp_path / "roc.png", label="toy")
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_card_table_has_a_row_per_set_and_mode():
    """IJB --all-modes gave one row of 57 columns: rows are now everything before the last '/'."""
    from dpface.eval.model_card import metrics_table

    modes = [f"{'flip' if f else 'noflip'}+{'norm' if n else 'nonorm'}" for f in (0, 1) for n in (0, 1)]
    metrics = {f"ijb/B/{m}/{k}": 0.5 for m in modes for k in ("tar@far=1e-4", "tar@far=1e-3", "auc")}
    metrics.update({"synthetic/acc": 0.9, "synthetic/auc": 0.95})
    lines = metrics_table(metrics).splitlines()
    assert len(lines) == 2 + len(modes) + 1
    assert lines[0] == "| set | tar@far=1e-4 | tar@far=1e-3 | auc | acc |"
    assert lines[2].startswith("| ijb/B/noflip+nonorm | 0.5000 | 0.5000 | 0.5000 |")
    assert lines[-1] == "| synthetic | – | – | 0.9500 | 0.9000 |"


def _insightface_nearest(scores, issame, far):
    """insightface's IJB reporting replayed with scikit-learn: its roc_curve (default
    drop_intermediate), then the first point minimising |fpr − far|."""
    from sklearn.metrics import roc_curve as sk_roc

    fpr, tpr, _ = sk_roc(np.asarray(issame, int), scores)
    _, i = min(zip(np.abs(fpr - far), range(len(fpr))))
    return float(tpr[i])


@pytest.mark.parametrize("seed", range(8))
def test_nearest_convention_replays_insightface_on_tie_heavy_scores(seed):
    pytest.importorskip("sklearn")
    from dpface.eval.verification import tar_at_far

    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 400))
    y = rng.random(n) < 0.3
    step = [0.05, 0.1, 0.2][seed % 3]  # coarse grids: many tied scores, collinear ROC runs
    s = np.round(np.where(y, rng.normal(0.5, 0.3, n), rng.normal(0.1, 0.3, n)) / step) * step
    fars = (1e-6, 1e-4, 1e-2, 0.05, 0.1, 0.3)  # including FARs below 1 / #negatives
    got = tar_at_far(s, y, fars, convention="nearest")
    for far in fars:
        assert got[far] == pytest.approx(_insightface_nearest(s, y, far), abs=1e-12), far
    strict = tar_at_far(s, y, fars)
    assert math.isnan(strict[1e-6]) and not math.isnan(got[1e-6])


def test_nearest_convention_hand_computed():
    """Negatives 0.9, 0.5, 0.5, 0.1; positives 0.95, 0.7, 0.5. ROC after the origin (one
    point per distinct score, descending): (0, 1/3), (1/4, 1/3), (1/4, 2/3), (3/4, 1),
    (1, 1). FAR 0.3 is nearest FPR 0.25, first at (1/4, 1/3): nearest reads 1/3 where strict
    reads 2/3 (threshold 0.5, one negative above it); FAR 0.6 is nearest 0.75 → 1, above the
    target, where strict reads 2/3 again."""
    from dpface.eval.verification import tar_at_far, tar_key

    s = [0.9, 0.5, 0.5, 0.1, 0.95, 0.7, 0.5]
    y = [False] * 4 + [True] * 3
    assert tar_at_far(s, y, (0.3, 0.6), "nearest") == pytest.approx({0.3: 1 / 3, 0.6: 1.0})
    assert tar_at_far(s, y, (0.3, 0.6)) == pytest.approx({0.3: 2 / 3, 0.6: 2 / 3})
    assert tar_key(0.01) == "tar@far=0.01" and tar_key(1e-4, "nearest") == "nearest_tar@far=0.0001"
    with pytest.raises(ValueError, match="strict, nearest"):
        tar_at_far(s, y, (0.3,), "closest")
