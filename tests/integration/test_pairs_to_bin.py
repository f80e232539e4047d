"""Issue 23: `dpface convert pairs-to-bin` — an image folder + an LFW-style pairs.txt → a .bin
that dpface's reader and an insightface-style reader (pickle with encoding='bytes', OpenCV's
decoder) both load, aligned by landmarks when given; `dpface eval --bin` on it; bad lines."""
import json
import math
import pickle

import numpy as np
import pytest

from dpface.cli import main
from dpface.data.align import skimage_transform, template_points
from dpface.data.synthetic.faces import SyntheticFaces
from dpface.eval.bin_sets import load_bin
from tests.integration.test_eval_protocols import TINY, checkpoint  # noqa: F401 - the module fixture

PAIRS = "1 4\nid0 1 2\nid1 1 3\nid0 3 id2 1\nid1 2 id2 2\n"


def folder(tmp_path, size=112):
    """3 people × 3 images (synthetic renders), LFW naming; returns (root, {(name, i): image})."""
    from PIL import Image

    faces = SyntheticFaces(seed=4, image_size=size)
    root, images = tmp_path / "photos", {}
    for p in range(3):
        (root / f"id{p}").mkdir(parents=True)
        for i in range(1, 4):
            img = faces.render(p, 500 + i)
            Image.fromarray(img).save(root / f"id{p}" / f"id{p}_{i:04d}.png")
            images[(f"id{p}", i)] = img
    (tmp_path / "pairs.txt").write_text(PAIRS)
    return root, images


def expected(images):
    a = [images[("id0", 1)], images[("id1", 1)], images[("id0", 3)], images[("id1", 2)]]
    b = [images[("id0", 2)], images[("id1", 3)], images[("id2", 1)], images[("id2", 2)]]
    return np.stack(a), np.stack(b), np.array([True, True, False, False])


def test_round_trip_through_both_readers(tmp_path, capsys):
    cv2 = pytest.importorskip("cv2")
    root, images = folder(tmp_path)
    out = tmp_path / "mine.bin"
    assert main(["convert", "pairs-to-bin", str(root), str(tmp_path / "pairs.txt"), str(out)]) == 0
    assert "wrote 4 pairs (2 same-person) of 8 images (0 resized to 112 px)" in capsys.readouterr().out
    a, b, same = load_bin(out)
    ea, eb, esame = expected(images)
    np.testing.assert_array_equal(a, ea)
    np.testing.assert_array_equal(b, eb)
    np.testing.assert_array_equal(same, esame)
    # insightface's reader: the pickle as Python 2 strings, each image through OpenCV (BGR)
    with open(out, "rb") as f:
        bins, issame_list = pickle.load(f, encoding="bytes")
    assert len(bins) == 8 and list(issame_list) == [True, True, False, False]
    for k, data in enumerate(bins):
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        np.testing.assert_array_equal(img, (ea if k % 2 == 0 else eb)[k // 2])
    assert main(["convert", "pairs-to-bin", str(root), str(tmp_path / "pairs.txt"), str(out)]) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err


def test_landmarks_align_each_image(tmp_path):
    """Each face is placed into a larger photo by a known similarity; its five points carried
    by the same placement align it back onto the crop."""
    from PIL import Image

    root, images = folder(tmp_path)
    tf = skimage_transform()
    rng = np.random.default_rng(0)
    lines = []
    for (name, i), crop in images.items():
        place = tf.SimilarityTransform(scale=rng.uniform(1.2, 1.5), rotation=rng.uniform(-0.3, 0.3),
                                       translation=rng.uniform(10, 30, 2))
        big = tf.warp(crop, place.inverse, output_shape=(200, 200), order=1, preserve_range=True)
        Image.fromarray(np.clip(np.rint(big), 0, 255).astype(np.uint8)).save(root / name / f"{name}_{i:04d}.png")
        pts = place(template_points(112))
        lines.append(f"{name}/{name}_{i:04d}.png " + " ".join(f"{v:.3f}" for v in pts.reshape(-1)))
    (tmp_path / "lm.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "aligned.bin"
    assert main(["convert", "pairs-to-bin", str(root), str(tmp_path / "pairs.txt"), str(out),
                 "--landmarks", str(tmp_path / "lm.txt")]) == 0
    a, _, _ = load_bin(out)
    ea, _, _ = expected(images)
    inner = (slice(16, 96), slice(16, 96))  # away from the black border the warps leave
    err = np.abs(a[:, inner[0], inner[1]].astype(float) - ea[:, inner[0], inner[1]]).mean()
    assert err < 6.0, err  # two bilinear resamplings; an unaligned crop is off by ~40
    (tmp_path / "lm.txt").write_text("\n".join(lines[1:]) + "\n")
    assert main(["convert", "pairs-to-bin", str(root), str(tmp_path / "pairs.txt"), str(out), "--overwrite",
                 "--landmarks", str(tmp_path / "lm.txt")]) == 2


@pytest.mark.parametrize("case, message", [
    ("missing", "pairs.txt:4: image"),
    ("line", "pairs.txt:3: expected 'NAME I J' or 'NAME1 I NAME2 J', got 'id1 one 3'"),
    ("one_kind", "all 2 pairs are matches"),
])
def test_bad_pairs_name_file_and_line_and_write_nothing(tmp_path, capsys, case, message):
    root, _ = folder(tmp_path)
    pairs = tmp_path / "pairs.txt"
    if case == "missing":
        pairs.write_text(PAIRS.replace("id0 3 id2 1", "id0 3 id2 9"))
    elif case == "line":
        pairs.write_text(PAIRS.replace("id1 1 3", "id1 one 3"))
    else:
        pairs.write_text("id0 1 2\nid1 1 3\n")
    out = tmp_path / "x.bin"
    assert main(["convert", "pairs-to-bin", str(root), str(pairs), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpface: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_eval_reads_the_converted_set(checkpoint, tmp_path, capsys):  # noqa: F811
    root, _ = folder(tmp_path)
    out = tmp_path / "mine.bin"
    assert main(["convert", "pairs-to-bin", str(root), str(tmp_path / "pairs.txt"), str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--bin", str(out), "eval.folds=2"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert 0 <= m["mine/acc"] <= 1 and not math.isnan(m["mine/auc"])
