"""The README's "Using it" lines, in order, CPU-sized: each line's own arguments plus
overrides that shrink the run; the data sets are small generated ones."""
import io
import json
from pathlib import Path

import numpy as np
import torch
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
    ijb = tmp_path / "ijb-synth"
    assert main(["convert", "synthetic-ijb", str(ijb), "--identities", "4"]) == 0
    assert main(["eval", "--checkpoint", str(ckpt), "--protocol", "ijb", "--ijb-dir", str(ijb), "--all-modes"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt), "--protocol", "ijb-1n", "--ijb-dir", str(ijb)]) == 0
    assert "ijb-1n/synth/mean/rank1" in json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(ckpt), "--protocol", "ijb", "--ijb-dir", str(ijb),
                 "--tar-convention", "nearest"]) == 0
    assert "ijb/synth/nearest_tar@far=0.0001" in json.loads(capsys.readouterr().out)
    for c in range(2):
        (tmp_path / "photos" / f"p{c}").mkdir(parents=True)
        for k in (1, 2):
            (tmp_path / "photos" / f"p{c}" / f"p{c}_{k:04d}.jpg").write_bytes(jpeg(100 + 10 * c + k))
    (tmp_path / "pairs.txt").write_text("p0 1 2\np1 1 2\np0 1 p1 2\np0 2 p1 1\n")
    assert main(["convert", "pairs-to-bin", str(tmp_path / "photos"), str(tmp_path / "pairs.txt"),
                 str(tmp_path / "mine.bin")]) == 0
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
    # starting from what exists (issue 21)
    assert main(["train", "--config", demo, "experiment.name=ft", f"train.init_from={tmp_path}/runs/cpu_demo",
                 "data.synthetic.seed=1", "train.freeze_backbone_steps=2", "train.backbone_lr_scale=0.3", *run]) == 0
    assert "backbone tensors loaded" in capsys.readouterr().out
    state = torch.load(ckpt / "trainer.pt", weights_only=True)["backbone"]
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "backbone.pth")
    assert main(["train", "--config", demo, "experiment.name=pth", f"train.init_from={tmp_path}/backbone.pth",
                 *run]) == 0
    assert main(["train", "--config", demo, "experiment.name=student", "model={name: iresnet_tiny, base_width: 8}",
                 f"aux_losses=[{{name: distill, teacher: {tmp_path}/runs/cpu_demo, kind: cosine, weight: 4.0}}]",
                 *run]) == 0
    assert "distill teacher" in capsys.readouterr().out
    sources = (f"data.sources=[{{manifest: {tmp_path}/ms1m-wds, weight: 0.7}}, "
               f"{{manifest: {tmp_path}/faces-wds, weight: 0.3}}]")
    assert main(["train", "--config", demo, "experiment.name=mixed", "data.backend=webdataset", sources,
                 "data.batch_size=4", "data.num_workers=0", "eval.bin_sets=[]", *run]) == 0
    assert "6 classes" in capsys.readouterr().out  # 3 + 3: the head sized by the total
    assert main(["train", "--config", demo, "experiment.name=epochs", "train.epochs=3", "train.warmup_epochs=0.5",
                 *run, "train.steps=0"]) == 0
    assert "epochs of" in capsys.readouterr().out
    (tmp_path / "mixed.yaml").write_text(f"base: {Path(demo).resolve()}\ndata:\n  backend: webdataset\n"
                                         f"  sources: {sources.split('=', 1)[1]}\n")
    assert main(["plan", "--config", str(tmp_path / "mixed.yaml"), "--world", "2", "--batch", "128"]) == 0
    assert "6 classes" in capsys.readouterr().out
