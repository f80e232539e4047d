"""Issue 12: the IJB template protocol, 1:N identification (CMC, TPIR@FPIR, distractors),
plots, and the three 10-fold protocol fixes."""
import json
import math

import numpy as np
import pytest
import torch

from dpface.cli import main
from dpface.data.align import align_face, similarity_to_template, template_points
from dpface.data.synthetic.ijb import make_synthetic_ijb
from dpface.engine.checkpoint import complete_checkpoints
from dpface.eval import best_threshold, kfold_accuracy
from dpface.eval.identification import cmc, rank1_vs_distractors, search, tpir_at_fpir
from dpface.eval.ijb import (
    IJB_FARS,
    ProtocolError,
    combine_features,
    evaluate_ijb_features,
    face_features,
    load_ijb,
    template_features,
    template_pair_scores,
)
from tests.helpers import tiny_overrides

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# ----------------------------------------------------------------------------- 10-fold fixes


def _insightface_threshold_choice(scores, issame):
    """insightface's calculate_roc on one training split: squared distances of unit embeddings
    (2 − 2·cos), an ascending grid np.arange(0, 4, 0.01), accept when dist < th, np.argmax
    over the accuracies. Returns the training predictions of the chosen threshold."""
    dist = 2.0 - 2.0 * scores
    grid = np.arange(0, 4, 0.01)
    acc = np.array([np.mean((dist < th) == issame) for th in grid])
    return dist < grid[int(np.argmax(acc))]


def test_best_threshold_ties_pick_insightface_choice():
    # candidates: -inf .5, .15 .75, .25 .5, .35 .75, inf .5 → the tie .15/.35 goes to .35
    t, acc = best_threshold([0.1, 0.2, 0.3, 0.4], [False, True, False, True])
    assert (t, acc) == (pytest.approx(0.35), 0.75)
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(60) < 0.5
        # coarse scores (many ties between intervals); the offset keeps them off the grid
        s = np.round(np.where(y, rng.normal(0.4, 0.3, 60), rng.normal(0.1, 0.3, 60)) / 0.05) * 0.05
        s = np.clip(s, -0.9, 0.9) + 0.0013
        t, _ = best_threshold(s, y)
        np.testing.assert_array_equal(s > t, _insightface_threshold_choice(s, y))


def test_best_threshold_adjacent_floats():
    lo = np.nextafter(1.0, 0.0)
    t, acc = best_threshold([lo, 1.0], [False, True])
    assert acc == 1.0 and lo <= t < 1.0
    accs, _ = kfold_accuracy([lo, 1.0, lo, 1.0, lo, 1.0], [False, True] * 3, num_folds=3)
    assert accs == [1.0, 1.0, 1.0]


def test_bin_sets_use_eval_folds(monkeypatch):
    """A set without fold ids (a .bin) is split into eval.folds parts, not always 10."""
    import dpface.eval.verification as verification
    from dpface.config import Config

    seen = []
    real = verification.evaluate_pairs

    def spy(*a, **kw):
        r = real(*a, **kw)
        seen.append(len(r.fold_accuracies))
        return r

    monkeypatch.setattr(verification, "evaluate_pairs", spy)
    cfg = Config()
    cfg.eval.folds = 4
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (2, 24, 8, 8, 3), dtype=np.uint8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64, 6))
    sets = {"lfw": (imgs[0], imgs[1], np.arange(24) % 2 == 0, None)}
    cfg.eval.run(model, sets, "cpu")
    assert seen == [4]


# ----------------------------------------------------------------------------- IJB


def test_template_aggregation_hand_computed():
    """Template 1: media 10 = faces (1,0), (0,1); media 11 = face (2,0). Template 2: (0,3)."""
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    templates, medias = np.array([1, 1, 1, 2]), np.array([10, 10, 11, 12])
    pair = np.array([[1, 2]])

    def score(x):
        tids, tf = template_features(x, templates, medias)
        np.testing.assert_allclose(np.linalg.norm(tf, axis=1), 1.0)
        return float(template_pair_scores(tids, tf, pair)[0])

    # norm kept: media means (.5,.5) and (2,0), sum (2.5,.5) → cos with (0,1) = .5/sqrt(6.5)
    assert score(combine_features(feats)) == pytest.approx(0.5 / math.sqrt(6.5))
    # faces normalised first: (.5,.5) + (1,0) = (1.5,.5)
    assert score(combine_features(feats, norm_score=False)) == pytest.approx(0.5 / math.sqrt(2.5))
    # detector scores (.5, 1, 1, 1) after normalising: (.25,.5) + (1,0) = (1.25,.5)
    det = np.array([0.5, 1.0, 1.0, 1.0])
    assert score(combine_features(feats, det_scores=det, norm_score=False)) == pytest.approx(
        0.5 / math.sqrt(1.25 ** 2 + 0.25))
    # flip: the mirrored view is summed before anything else
    flipped = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 1.0]])
    # faces (2,0), (0,2), (2,2), (0,4); media means (1,1), (2,2) → (3,3) → cos = 1/sqrt(2)
    assert score(combine_features(feats, flipped)) == pytest.approx(1 / math.sqrt(2))


def _blob_image(size=112):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = np.zeros((size, size))
    for x, y in template_points(size):
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0 ** 2))
    return np.repeat((np.clip(img, 0, 1) * 255)[..., None], 3, axis=2).astype(np.uint8)


def _centroids(crop, size=112):
    g = crop[..., 0].astype(np.float64)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for x, y in template_points(size):
        win = (np.abs(xx - x) < 6) & (np.abs(yy - y) < 6)
        w = g * win
        out.append([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])
    return np.array(out)


def test_alignment_puts_landmarks_on_the_template():
    from skimage.transform import SimilarityTransform, warp

    rng = np.random.default_rng(1)
    crop = _blob_image()
    base = _centroids(crop)  # the blobs' own centroids (quantisation of the drawing)
    for _ in range(5):
        place = SimilarityTransform(scale=rng.uniform(0.7, 1.6), rotation=rng.uniform(-0.6, 0.6),
                                    translation=rng.uniform(30, 60, 2))
        big = warp(crop, place.inverse, output_shape=(260, 260), order=1, preserve_range=True)
        landmarks = place(template_points())
        t = similarity_to_template(landmarks)
        assert np.abs(t(landmarks) - template_points()).max() < 0.5  # the transform itself
        aligned = align_face(big.astype(np.uint8), landmarks)
        assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
        assert np.abs(_centroids(aligned) - base).max() < 0.5  # the pixels land there too


def _tiny_model():
    from dpface.models import build_backbone

    torch.manual_seed(0)
    return build_backbone({"name": "iresnet_tiny", "base_width": 8}, embedding_size=16).eval()


@pytest.fixture(scope="module")
def ijb_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("ijb") / "set"
    info = make_synthetic_ijb(out, num_identities=8, templates_per_identity=2, max_media=2,
                              max_faces_per_media=2, seed=0)
    return out, info


def _brute_tar(scores, issame, far):
    pos, neg = scores[issame], scores[~issame]
    if far * neg.size < 1 - 1e-9:
        return float("nan")
    for t in np.concatenate(([-np.inf], np.unique(scores))):
        if np.mean(neg > t) <= far:
            return float(np.mean(pos > t))


def test_synthetic_ijb_tar_at_far_matches_brute_force(ijb_set):
    out, info = ijb_set
    s = load_ijb(out)
    assert len(s) == info["faces"] and len(s.pairs) == info["pairs"] == 16 * 15 // 2
    assert int(s.issame.sum()) == 8 and len(np.unique(s.medias)) == info["media"]
    assert s.det_scores.min() > 0 and s.det_scores.max() <= 1 and s.det_scores.std() > 0.05
    feats, flipped = face_features(_tiny_model(), s, batch_size=32)
    for flip, norm, det in [(True, True, True), (False, False, False), (True, False, True)]:
        r = evaluate_ijb_features(s, feats, flipped, flip=flip, norm_score=norm, detector_score=det)
        # brute force: per template a dict media → faces, in plain Python
        by_t: dict = {}
        for f in range(len(s)):
            x = feats[f].astype(np.float64) + (flipped[f] if flip else 0)
            if not norm:
                x = x / np.linalg.norm(x)
            if det:
                x = x * s.det_scores[f]
            by_t.setdefault(int(s.templates[f]), {}).setdefault(int(s.medias[f]), []).append(x)
        tf = {}
        for t, media in by_t.items():
            v = sum(np.mean(faces, axis=0) for faces in media.values())
            tf[t] = v / np.linalg.norm(v)
        want = np.array([tf[a] @ tf[b] for a, b in s.pairs])
        np.testing.assert_allclose(r["scores"], want, atol=1e-9)
        for far in IJB_FARS:
            got, exp = r["tar_at_far"][far], _brute_tar(want, s.issame, far)
            assert (math.isnan(got) and math.isnan(exp)) or got == pytest.approx(exp)
        assert not math.isnan(r["tar_at_far"][1e-1])


def _copy_set(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _meta(d, kind):
    return next((d / "meta").glob(f"*{kind}"))


def test_ijb_bad_input(ijb_set, tmp_path):
    src, _ = ijb_set
    # a missing meta file
    d = _copy_set(src, tmp_path / "a")
    _meta(d, "_template_pair_label.txt").unlink()
    with pytest.raises(ProtocolError, match="missing meta file \\*_template_pair_label.txt"):
        load_ijb(d)
    # a malformed row: its line number
    d = _copy_set(src, tmp_path / "b")
    p = _meta(d, "_face_tid_mid.txt")
    lines = p.read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0]
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ProtocolError, match=f"{p.name}:3: expected 'IMAGE TEMPLATE_ID MEDIA_ID'"):
        load_ijb(d)
    lines[2] = "3.jpg one 2"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ProtocolError, match=f"{p.name}:3: the template id must be an integer"):
        load_ijb(d)
    # a template with no faces
    d = _copy_set(src, tmp_path / "c")
    p = _meta(d, "_template_pair_label.txt")
    p.write_text(p.read_text() + "1 999 0\n")
    n = len(p.read_text().splitlines())
    with pytest.raises(ProtocolError, match=f"{p.name}:{n}: template 999 has no faces"):
        load_ijb(d)
    # landmarks outside the image
    d = _copy_set(src, tmp_path / "e")
    p = _meta(d, "_name_5pts_score.txt")
    lines = p.read_text().splitlines()
    f = lines[4].split()
    f[3] = "500.0"
    lines[4] = " ".join(f)
    p.write_text("\n".join(lines) + "\n")
    s = load_ijb(d)
    with pytest.raises(ProtocolError, match=f"{p.name}:5: landmark 2 of {f[0]} at \\(500, .*outside"):
        face_features(_tiny_model(), s)
    # an image that does not decode
    d = _copy_set(src, tmp_path / "g")
    (d / "loose_crop" / "2.jpg").write_bytes(b"not a jpeg")
    s = load_ijb(d)
    with pytest.raises(ProtocolError, match="2.jpg \\(listed at .*_name_5pts_score.txt:2\\): image does not decode"):
        face_features(_tiny_model(), s)


# ----------------------------------------------------------------------------- identification


def _brute_search(g, gl, p, pl, d):
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    all_e = g if d is None else np.concatenate([g, d / np.linalg.norm(d, axis=1, keepdims=True)])
    all_l = list(gl) + [None] * (0 if d is None else len(d))
    ranks, mates, tops = [], [], []
    for i in range(len(p)):
        sims = all_e @ p[i]
        same = [k for k, l in enumerate(all_l) if l == pl[i]]
        tops.append(sims.max())
        if not same:
            ranks.append(0)
            mates.append(-np.inf)
            continue
        m = max(sims[k] for k in same)
        ranks.append(1 + sum(1 for k in range(len(all_l)) if k not in same and sims[k] >= m))
        mates.append(m)
    return np.array(ranks), np.array(mates), np.array(tops)


def _ident_data(seed=0, n_id=30, n_probe=3, dim=8, n_d=50, nonmated=8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_id, dim))
    gl = np.arange(n_id - nonmated)
    g = centres[gl] + 0.6 * rng.normal(size=(gl.size, dim))
    pl = np.repeat(np.arange(n_id), n_probe)
    p = centres[pl] + 0.6 * rng.normal(size=(pl.size, dim))
    d = rng.normal(size=(n_d, dim))
    return g.astype(np.float32), gl, p.astype(np.float32), pl, d.astype(np.float32)


def test_identification_cmc_and_tpir_match_brute_force():
    g, gl, p, pl, d = _ident_data()
    for dd in (None, d):
        r = search(g, gl, p, pl, dd)
        ranks, mates, tops = _brute_search(g.astype(np.float64), gl, p.astype(np.float64), pl,
                                           None if dd is None else dd.astype(np.float64))
        np.testing.assert_array_equal(r["rank"], ranks)
        np.testing.assert_allclose(r["top_score"], tops, atol=1e-5)
        mated = ranks > 0
        for k, v in cmc(r, (1, 5, 10)).items():
            assert v == pytest.approx(np.mean(ranks[mated] <= k))
        nm = np.sort(tops[~mated])
        for fpir, got in tpir_at_fpir(r, (0.1, 0.25, 0.01)).items():
            # brute force: the lowest threshold among the non-mated scores (or -inf) whose
            # share of non-mated probes above it is <= fpir; count mated rank-1 hits above it
            cands = [t for t in np.concatenate(([-np.inf], nm)) if np.mean(nm > t) <= fpir]
            if fpir * nm.size < 1:
                assert math.isnan(got)
                continue
            t = min(cands)
            assert np.mean(nm > t) <= fpir
            want = np.sum((ranks == 1) & (mates > t)) / mated.sum()
            assert got == pytest.approx(want, abs=1e-6), fpir


def test_distractors_only_lower_rank1():
    g, gl, p, pl, d = _ident_data(seed=3, n_d=300)
    counts = [0, 1, 10, 30, 100, 300]
    curve = rank1_vs_distractors(g, gl, p, pl, d, counts)
    vals = [curve[n] for n in counts]
    assert all(b <= a for a, b in zip(vals, vals[1:])) and vals[-1] < vals[0]
    # per probe too: a distractor can only push a mate down
    r0, r1 = search(g, gl, p, pl)["rank"], search(g, gl, p, pl, d)["rank"]
    assert np.all(r1 >= r0)


# ----------------------------------------------------------------------------- plots


def _is_png(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_plots_are_valid_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from dpface.eval.plots import cmc_plot, det_plots, distractor_plot, roc_plot, roc_plots
    from dpface.eval.verification import roc_curve

    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.5
    fpr, tpr, _ = roc_curve(np.where(y, rng.normal(1, 1, 400), rng.normal(0, 1, 400)), y)
    roc_plot(fpr, tpr, tmp_path / "roc1.png", label="toy")
    paths = [tmp_path / "roc1.png",
             roc_plots({"a": (fpr, tpr), "b": (fpr, tpr ** 2)}, tmp_path / "roc.png", title="t"),
             det_plots({"a": (fpr, tpr)}, tmp_path / "sub" / "det.png"),
             cmc_plot({"0": ([1, 2, 5, 10], [0.5, 0.6, 0.8, 0.9])}, tmp_path / "cmc.png"),
             distractor_plot([0, 10, 100], [0.9, 0.8, 0.6], tmp_path / "dis.png")]
    for p in paths:
        _is_png(p)


# ----------------------------------------------------------------------------- command line

TINY = tiny_overrides("head.embedding_size=16", "train.steps=2", "train.log_every=2",
                      "eval.num_identities=12")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "--config", "configs/cpu_demo.yaml", f"experiment.output_dir={out}",
                 "experiment.name=proto", *TINY]) == 0
    return complete_checkpoints(out / "proto" / "checkpoints")[-1]


def test_cli_ijb_and_identification(checkpoint, ijb_set, tmp_path, capsys):
    run_dir = checkpoint.parent.parent
    d = tmp_path / "cli_ijb"
    assert main(["convert", "synthetic-ijb", str(d), "--identities", "4"]) == 0
    assert "4 identities" in capsys.readouterr().out
    assert main(["convert", "synthetic-ijb", str(d), "--identities", "4"]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(checkpoint), "--protocol", "ijb",
                 "--ijb-dir", str(ijb_set[0]), "--all-modes"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert 0 <= m["ijb/synth/flip+norm+det/tar@far=0.1"] <= 1
    assert m["ijb/synth/noflip-nonorm-nodet/tar@far=1e-06"] is None  # 112 impostors: unresolved
    assert len([k for k in m if k.endswith("/auc")]) == 8
    assert main(["eval", "--checkpoint", str(checkpoint), "--protocol", "ijb",
                 "--ijb-dir", str(ijb_set[0]), "--no-flip", "--no-detector-score"]) == 0
    assert "ijb/synth/tar@far=0.1" in json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(checkpoint), "--protocol", "identification",
                 "--distractors", "5,20", "--probes-per-identity", "2"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["ident/d=20/rank1"] <= m["ident/d=5/rank1"] <= m["ident/rank1"]
    assert m["ident/rank1"] <= m["ident/rank5"] <= m["ident/rank10"]
    assert "ident/tpir@fpir=0.1" in m and m["ident/tpir@fpir=0.01"] is None  # 6 non-mated probes
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    step = f"step{int(checkpoint.name.split('-')[1]):08d}"
    for name in (f"ijb-synth-roc-{step}.png", f"ijb-synth-det-{step}.png",
                 f"ident-cmc-{step}.png", f"ident-rank1-vs-distractors-{step}.png",
                 f"roc-synthetic-{step}.png", f"det-synthetic-{step}.png"):
        assert name in plots
        _is_png(run_dir / "plots" / name)


def test_cli_ijb_errors(checkpoint, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(checkpoint), "--protocol", "ijb"]) == 2
    assert "needs --ijb-dir" in capsys.readouterr().err
    (tmp_path / "meta").mkdir()
    assert main(["eval", "--checkpoint", str(checkpoint), "--protocol", "ijb",
                 "--ijb-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpface: error: ") and "missing meta file *_face_tid_mid.txt" in err
    assert main(["eval", "--checkpoint", str(checkpoint), "--protocol", "identification",
                 "--distractors", "ten"]) == 2
    assert "--distractors" in capsys.readouterr().err


def test_cli_sets_protocol_matches_the_library(checkpoint, capsys):
    """`dpface eval --protocol sets` reports what eval.sets computes on the restored backbone."""
    from dpface.data.synthetic.templates import make_templates
    from dpface.eval.sets import evaluate_set_poolings
    from dpface.restore import load_backbone

    assert main(["eval", "--checkpoint", str(checkpoint), "--protocol", "sets", "--identities", "6",
                 "--templates-per-identity", "2"]) == 0
    m = json.loads(capsys.readouterr().out)
    backbone, cfg = load_backbone(checkpoint)[:2]
    s = cfg.data.synthetic
    t = make_templates(6, s.num_identities, templates_per_identity=2, seed=s.seed,
                       image_size=cfg.data.image_size, difficulty=s.difficulty)
    want = evaluate_set_poolings(backbone, t, fars=tuple(cfg.eval.fars))
    assert set(want) == {"mean", "norm"}  # not a qan backbone: no quality pooling
    def same(got, want):  # the CLI's JSON writes an unresolved (NaN) TAR as null
        return got is None if want != want else got == pytest.approx(want)

    for how, v in want.items():
        assert same(m[f"sets/{how}/rank1"], v["rank1"])
        for far, tar in v["tar_at_far"].items():
            assert same(m[f"sets/{how}/tar@far={far:g}"], tar)
    assert any(v is not None for v in m.values())
    assert main(["eval", "--checkpoint", str(checkpoint), "--protocol", "sets",
                 "--templates-per-identity", "1"]) == 2
    assert "dpface: error: --protocol sets: templates_per_identity" in capsys.readouterr().err
