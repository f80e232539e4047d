"""The README's "Using it" lines, in order, CPU-sized: each line's own arguments plus
overrides that shrink the run; the data sets are small generated ones."""
import io
import json

import numpy as np
from PIL import Image

from dpface.cli import main
from tests.helpers import tiny_overrides

TINY = tiny_overrides("train.steps=4", "train.log_every=2")


def jpeg(seed):
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (112, 112, 3), np.uint8)).save(
        out, format="JPEG")
    return out.getvalue()


def test_readme_usage_lines_in_order(tmp_path, capsys):
    from dpface.data.formats.recordio import write_insightface_rec
    from dpface.data.synthetic.pairs import make_verification_pairs
    from dpface.eval.bin_sets import write_bin

    run = [f"experiment.output_dir={tmp_path}/runs", *TINY]
    demo = "configs/cpu_demo.yaml"
    assert main(["train", "--config", demo, "train.lr=0.05", "head.loss.s=30", *run]) == 0
    assert main(["train", "--config", demo, "--resume", "auto", *run, "train.steps=6"]) == 0
    ckpt = tmp_path / "runs" / "cpu_demo" / "checkpoints" / "step-00000006"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt)]) == 0
    assert "synthetic/acc" in json.loads(capsys.readouterr().out)
    for name, offset in (("lfw", 12), ("cfp_fp", 30)):
        p = make_verification_pairs(num_pairs=20, identity_offset=offset, num_identities=10,
                                    seed=0, num_folds=2)
        write_bin(tmp_path / f"{name}.bin", p.images_a, p.images_b, p.issame)
    assert main(["eval", "--checkpoint", str(ckpt), "--bin", str(tmp_path / "lfw.bin"),
                 "--bin", str(tmp_path / "cfp_fp.bin")]) == 0
    assert {"lfw/acc", "cfp_fp/acc"} <= set(json.loads(capsys.readouterr().out))
    assert main(["plan", "--classes", "2000000", "--dim", "512", "--world", "64", "--batch", "128",
                 "--sample-rate", "0.1"]) == 0
    assert main(["train", "--config", demo, "head.sample_rate=0.1", "head.update=sampled", *run,
                 "experiment.name=pfc"]) == 0
    capsys.readouterr()
    assert main(["kernels"]) == 0
    assert "dpface kernels: " in capsys.readouterr().out
    assert main(["train", "--config", demo, "head.kernel=reference", *run,
                 "experiment.name=reference"]) == 0
    assert "head: PyTorch reference (head.kernel=reference)" in capsys.readouterr().out
    assert main(["export-head", "--checkpoint", str(ckpt), "--out", str(tmp_path / "head.pt")]) == 0
    for c in range(3):
        (tmp_path / "faces" / f"id{c}").mkdir(parents=True)
        for k in range(2):
            (tmp_path / "faces" / f"id{c}" / f"{k}.jpg").write_bytes(jpeg(10 * c + k))
    assert main(["convert", "folder", str(tmp_path / "faces"), str(tmp_path / "faces-wds"),
                 "--workers", "0"]) == 0
    write_insightface_rec(str(tmp_path / "train.rec"), str(tmp_path / "train.idx"),
                          [(i % 3, jpeg(i)) for i in range(6)], num_classes=3)
    assert main(["convert", "recordio", str(tmp_path / "train.rec"), str(tmp_path / "ms1m-wds"),
                 "--workers", "0"]) == 0
    assert (tmp_path / "ms1m-wds" / "manifest.json").is_file()
