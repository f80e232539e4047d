"""Issue 23: the IJB 1:N protocol (galleries G1 / G2, mixed-media probes) against brute-force
counting on hand-made templates, its bad input, and `dpface eval --protocol ijb-1n` on the
synthetic set `dpface convert synthetic-ijb` writes."""
import json
import math

import numpy as np
import pytest

from dpface.cli import main
from dpface.data.synthetic.ijb import make_synthetic_ijb
from dpface.eval.ijb import ProtocolError
from dpface.eval.ijb_1n import evaluate_ijb_1n_features, load_ijb_1n
from tests.integration.test_eval_protocols import TINY, checkpoint  # noqa: F401 - the module fixture


def write_set(d, faces, g1, g2, probes):
    """A 1:N meta directory: ``faces`` [(template, media)], lists {template: subject}."""
    meta = d / "meta"
    meta.mkdir(parents=True)
    (meta / "hm_face_tid_mid.txt").write_text("".join(f"{i}.jpg {t} {m}\n" for i, (t, m) in enumerate(faces)))
    pts = " ".join(["10 10"] * 5)
    (meta / "hm_name_5pts_score.txt").write_text("".join(f"{i}.jpg {pts} 0.9\n" for i in range(len(faces))))
    for name, lst in (("gallery_G1", g1), ("gallery_G2", g2), ("probe_mixed", probes)):
        rows = ["TEMPLATE_ID,SUBJECT_ID,FILENAME"]
        for t, sub in lst.items():
            rows += [f"{t},{sub},{i}.jpg" for i, (ft, _) in enumerate(faces) if ft == t]
        (meta / f"hm_1N_{name}.csv").write_text("\n".join(rows) + "\n")
    return d


def hand_made(tmp_path, seed=0):
    """12 subjects: 6 in each gallery (one template each); 2 probe templates per subject, so
    every probe is mated in one gallery and non-mated in the other. Templates hold 1-3 media of
    1-2 faces; features are random with the subject's direction mixed in."""
    rng = np.random.default_rng(seed)
    faces, g1, g2, probes, subject_dir = [], {}, {}, {}, rng.standard_normal((12, 8))
    t = 0
    feats = []
    for sub in range(12):
        for k in range(3):
            t += 1
            (g1 if sub < 6 else g2)[t] = sub + 100 if k == 0 else None
            if k:
                probes[t] = sub + 100
            for m in range(int(rng.integers(1, 4))):
                for _ in range(int(rng.integers(1, 3))):
                    faces.append((t, 1000 * t + m))
                    feats.append(subject_dir[sub] * rng.uniform(0.2, 1.0) + rng.standard_normal(8))
    g1 = {k: v for k, v in g1.items() if v is not None}
    g2 = {k: v for k, v in g2.items() if v is not None}
    return write_set(tmp_path / "set", faces, g1, g2, probes), np.array(feats), faces, g1, g2, probes


def brute_force(feats, faces, gallery, probes, ranks=(1, 5, 10), fpirs=(0.01, 0.1)):
    """The protocol counted out loop by loop: template = normalised sum over media of the mean
    face; for each probe the competitors scoring at least its mate, the top score; TPIR with at
    most floor(FPIR·N) non-mated top scores above the threshold."""
    def template(t):
        media = {}
        for f, (ft, m) in zip(feats, faces):
            if ft == t:
                media.setdefault(m, []).append(f)
        v = sum(np.mean(fs, axis=0) for fs in media.values())
        return v / np.linalg.norm(v)

    gal = {t: template(t) for t in gallery}
    rank, mate, top, mated = [], [], [], []
    for p, sub in probes.items():
        v = template(p)
        scores = {t: float(v @ g) for t, g in gal.items()}
        top.append(max(scores.values()))
        mine = [s for t, s in scores.items() if gallery[t] == sub]
        if mine:
            best = max(mine)
            rank.append(1 + sum(1 for t, s in scores.items() if gallery[t] != sub and s >= best))
            mate.append(best)
            mated.append(True)
        else:
            rank.append(0)
            mate.append(-math.inf)
            mated.append(False)
    rank, mate, top, mated = map(np.array, (rank, mate, top, mated))
    out = {f"rank{k}": float(np.mean(rank[mated] <= k)) for k in ranks}
    nm = sorted(top[~mated], reverse=True)
    for f in fpirs:
        k = math.floor(f * len(nm) + 1e-9)
        if k < 1:
            out[f"tpir@fpir={f:g}"] = float("nan")
            continue
        t = nm[k] if k < len(nm) else -math.inf
        out[f"tpir@fpir={f:g}"] = float(np.sum((rank == 1) & (mate > t)) / mated.sum())
    out.update(mated=int(mated.sum()), non_mated=int((~mated).sum()), gallery=len(gallery))
    return out


def test_1n_matches_brute_force_counting(tmp_path):
    d, feats, faces, g1, g2, probes = hand_made(tmp_path)
    s = load_ijb_1n(d)
    assert set(s.galleries) == {"G1", "G2"} and s.probes[0].size == len(probes)
    got = evaluate_ijb_1n_features(s, feats, flip=False, norm_score=True, detector_score=False,
                                   fpirs=(0.1, 0.25))
    for name, gallery in (("G1", g1), ("G2", g2)):
        want = brute_force(feats, faces, gallery, probes, fpirs=(0.1, 0.25))
        assert got[name].keys() == want.keys()
        for k, v in want.items():
            assert got[name][k] == pytest.approx(v, nan_ok=True), (name, k)
        assert want["mated"] == want["non_mated"] == 12 and want["rank1"] < 1  # both kinds, not trivial
    assert got["mean"]["rank1"] == pytest.approx((got["G1"]["rank1"] + got["G2"]["rank1"]) / 2)


@pytest.mark.parametrize("case, message", [
    ("unknown", "hm_1N_probe_mixed.csv:3: template 999 has no faces"),
    ("empty", "hm_1N_gallery_G2.csv: no templates listed"),
    ("header", "hm_1N_gallery_G1.csv:1: the header must name TEMPLATE_ID and SUBJECT_ID"),
    ("subject", "hm_1N_probe_mixed.csv:3: template 2 is subject 7 here but 100 at line 2"),
    ("missing", "the 1:N protocol needs *_1N_gallery_*.csv gallery lists and one *_1N_probe_mixed.csv"),
])
def test_1n_bad_meta_names_file_and_line(tmp_path, case, message):
    d, *_ = hand_made(tmp_path)
    meta = d / "meta"
    probe = meta / "hm_1N_probe_mixed.csv"
    lines = probe.read_text().splitlines()
    if case == "unknown":
        lines[2] = "999,100,x.jpg"
        probe.write_text("\n".join(lines) + "\n")
    elif case == "empty":
        (meta / "hm_1N_gallery_G2.csv").write_text("TEMPLATE_ID,SUBJECT_ID\n")
    elif case == "header":
        g1 = meta / "hm_1N_gallery_G1.csv"
        g1.write_text("T,S\n" + "\n".join(g1.read_text().splitlines()[1:]) + "\n")
    elif case == "subject":
        first = lines[1].split(",")
        lines[2] = f"{first[0]},7,y.jpg"
        probe.write_text("\n".join(lines) + "\n")
    else:
        probe.unlink()
    with pytest.raises(ProtocolError, match=message.replace("*", r"\*")):
        load_ijb_1n(d)


def test_cli_ijb_1n_on_the_synthetic_set(checkpoint, tmp_path, capsys):  # noqa: F811
    d = tmp_path / "ijb"
    make_synthetic_ijb(d, num_identities=6, templates_per_identity=3, max_media=2, max_faces_per_media=2)
    assert main(["eval", "--checkpoint", str(checkpoint), "--protocol", "ijb-1n", "--ijb-dir", str(d)]) == 0
    captured = capsys.readouterr()
    m = json.loads(captured.out)
    for g in ("G1", "G2"):
        assert m[f"ijb-1n/synth/{g}/mated"] == 6 and m[f"ijb-1n/synth/{g}/non_mated"] == 6
        assert m[f"ijb-1n/synth/{g}/rank1"] <= m[f"ijb-1n/synth/{g}/rank5"] <= 1
    assert m["ijb-1n/synth/mean/rank1"] == pytest.approx((m["ijb-1n/synth/G1/rank1"] + m["ijb-1n/synth/G2/rank1"]) / 2)
    assert "galleries G1 (3 templates), G2 (3 templates); 12 probe templates" in captured.err
    run_dir = checkpoint.parent.parent
    assert list((run_dir / "plots").glob("ijb-1n-synth-cmc-step*.png"))
    assert "| ijb-1n/synth/G1 |" in (run_dir / "MODEL_CARD.md").read_text()  # a row of the card's table
    (d / "meta" / "synth_1N_probe_mixed.csv").write_text("TEMPLATE_ID,SUBJECT_ID\n4242,1\n")
    assert main(["eval", "--checkpoint", str(checkpoint), "--protocol", "ijb-1n", "--ijb-dir", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpface: error: ") and "synth_1N_probe_mixed.csv:2: template 4242 has no faces" in err


def test_cli_tar_convention(checkpoint, tmp_path, capsys):  # noqa: F811
    """--tar-convention nearest (eval.tar_convention) names its keys and reports where strict
    cannot (FAR below 1 / impostors); a bad value is a config error."""
    d = tmp_path / "ijb"
    make_synthetic_ijb(d, num_identities=4, templates_per_identity=2, max_media=1, max_faces_per_media=1)
    args = ["eval", "--checkpoint", str(checkpoint), "--protocol", "ijb", "--ijb-dir", str(d)]
    assert main(args) == 0
    strict = json.loads(capsys.readouterr().out)
    assert main([*args, "--tar-convention", "nearest"]) == 0
    nearest = json.loads(capsys.readouterr().out)
    assert strict["ijb/synth/tar@far=1e-06"] is None and not any(k.startswith("ijb/synth/nearest") for k in strict)
    assert 0 <= nearest["ijb/synth/nearest_tar@far=1e-06"] <= 1 and "ijb/synth/tar@far=0.1" not in nearest
    assert main(["eval", "--checkpoint", str(checkpoint), "eval.tar_convention=nearest"]) == 0
    assert "synthetic/nearest_tar@far=0.1" in json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(checkpoint), "eval.tar_convention=closest"]) == 2
    assert "eval.tar_convention" in capsys.readouterr().err
