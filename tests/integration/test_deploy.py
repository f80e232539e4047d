"""From a checkpoint to a deployable model: ONNX export checked with
onnxruntime (random, synthetic-eval and real photographs; dynamic batch; metadata; bad
checkpoints), the model card a run writes and `dpface eval` appends to, and a real-face
smoke path on scikit-image's bundled photographs (detect → crop → 112 → embed → ONNX parity).

One tiny run and one export serve the whole module (the export is the slow part, ~8 s).
"""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpface.cli import main
from dpface.engine.checkpoint import complete_checkpoints
from dpface.restore import load_backbone

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from dpface.data.transforms import normalize  # noqa: E402
from dpface.eval import export_onnx as xo  # noqa: E402
from dpface.eval import model_card as mc  # noqa: E402
from tests.helpers import tiny_overrides  # noqa: E402

TINY = tiny_overrides("train.steps=4", "train.log_every=2", "train.eval_every=2")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "--config", "configs/cpu_demo.yaml", f"experiment.output_dir={out}",
                 "experiment.name=deploy", *TINY]) == 0
    return out / "deploy"


@pytest.fixture(scope="module")
def ckpt(run):
    return complete_checkpoints(run / "checkpoints")[-1]


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    report = xo.export_checkpoint(load_backbone(ckpt), out, num_images=16)
    backbone, cfg = load_backbone(ckpt)[:2]
    return out, report, backbone, cfg


# -- ONNX export ------------------------------------------------------------------------
def test_export_cli_prints_parity_and_writes_model(ckpt, tmp_path, capsys, monkeypatch, exported):
    # The CLI path, with the (slow, already tested) export replaced by a copy of the module's.
    good = exported[0]

    def fake_export(module, out, image_size=112, metadata=None, opset=None):
        shutil.copy(good, out)
        return 20, 0.0

    monkeypatch.setattr(xo, "export", fake_export)
    out = tmp_path / "m.onnx"
    assert main(["export-onnx", "--checkpoint", str(ckpt), "--out", str(out), "--check-images", "8"]) == 0
    text = capsys.readouterr().out
    assert "synthetic eval pairs: max |Δ|" in text and "random inputs" in text and out.is_file()
    # A check that fails: one error line, exit 1, the model kept aside as .unverified.
    out2 = tmp_path / "m2.onnx"
    assert main(["export-onnx", "--checkpoint", str(ckpt), "--out", str(out2), "--tol", "1e-15",
                 "--check-images", "4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpface: error: onnxruntime disagrees") and "1e-15" in err[0]
    assert not out2.exists() and (tmp_path / "m2.onnx.unverified").is_file()


def test_export_matches_pytorch_on_eval_and_random_images(exported):
    path, report, backbone, cfg = exported
    assert set(report.checks) == {"16 images of synthetic eval pairs", "8 random inputs"}
    assert report.max_abs_diff <= 1e-4
    for c in report.checks.values():
        assert c["max_abs_diff_raw"] <= 1e-4 * max(1.0, c["max_abs_raw"])
    print(f"export {report.export_s:.1f} s; max |Δ| {report.max_abs_diff:.2e}")


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch(exported, batch):
    path, _, backbone, cfg = exported
    session = xo.ort_session(path)
    (inp,) = session.get_inputs()
    assert inp.name == "data" and inp.shape[1:] == [3, 112, 112] and not isinstance(inp.shape[0], int)
    assert session.get_outputs()[0].name == "embedding"
    images, _ = xo.check_images(cfg, batch)
    for x in (xo.insightface_normalize(images), torch.rand(batch, 3, 112, 112) * 2 - 1):
        got = torch.from_numpy(session.run(None, {"data": x.numpy()})[0])
        with torch.no_grad():
            ref = backbone(x)
        assert got.shape == (batch, 32)
        assert (F.normalize(got, dim=1) - F.normalize(ref, dim=1)).abs().max() <= 1e-4


def test_metadata_and_input_convention(exported):
    path, report, _, _ = exported
    meta = xo.read_metadata(path)
    model = onnx.load(str(path))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert meta["opset"] == str(opset) == str(report.opset)
    assert "(pixel - 127.5) / 127.5" in meta["preprocessing"] and "RGB" in meta["preprocessing"]
    assert meta["embedding_size"] == "32" and json.loads(meta["backbone"])["name"] == "iresnet_tiny"
    assert meta["step"] == "4"
    # dpface's own normalisation is the insightface one, so the graph is the bare backbone.
    assert xo.insightface_normalize(torch.tensor([[[[0, 255]]] * 3], dtype=torch.uint8)).tolist() == \
        normalize(torch.tensor([[[[0, 255]]] * 3], dtype=torch.uint8)).tolist()


def test_insightface_input_wrapper_converts_conventions():
    # Were dpface's MEAN/STD different, the export wraps the backbone: insightface input in,
    # dpface normalisation into the backbone.
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.flatten(1)

    pixels = torch.tensor([0.0, 127.5, 255.0]).view(1, 3, 1, 1)
    xo.InsightfaceInput(Probe(), mean=100.0, std=50.0)((pixels - 127.5) / 127.5)
    assert torch.allclose(seen["x"].flatten(), (pixels.flatten() - 100.0) / 50.0)


def test_checkpoint_without_backbone_is_one_clear_error(ckpt, tmp_path, capsys):
    bad = tmp_path / "checkpoints" / "step-00000004"
    bad.mkdir(parents=True)
    shutil.copy(ckpt / "meta.json", bad / "meta.json")
    torch.save({"step": 4}, bad / "trainer.pt")
    assert main(["export-onnx", "--checkpoint", str(bad), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad / "trainer.pt") in err[0] and "no backbone" in err[0]
    (bad / "trainer.pt").unlink()
    assert main(["export-onnx", "--checkpoint", str(bad), "--out", str(tmp_path / "x.onnx")]) == 2
    assert str(bad / "trainer.pt") in capsys.readouterr().err
    assert main(["export-onnx", "--checkpoint", str(tmp_path / "none"), "--out", "x.onnx"]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_verify_catches_a_different_model(exported):
    path, _, backbone, _ = exported
    other = load_backbone(exported[1].metadata["checkpoint"])[0]
    with torch.no_grad():
        next(other.parameters()).add_(0.05)
    with pytest.raises(xo.ExportError, match="disagrees"):
        xo.verify(path, other, {"random": torch.rand(2, 3, 112, 112) * 2 - 1})


# -- real photographs (scikit-image's bundled LFW crops and astronaut) -------------------
def _real_faces(n_lfw: int = 8) -> tuple[torch.Tensor, dict]:
    pytest.importorskip("skimage")
    from skimage import data, feature, transform

    photo = data.astronaut()  # RGB 512×512, one frontal face
    cascade = feature.Cascade(data.lbp_frontal_face_cascade_filename())
    found = cascade.detect_multi_scale(img=photo, scale_factor=1.2, step_ratio=1,
                                       min_size=(60, 60), max_size=(300, 300))
    assert len(found) >= 1, "the LBP cascade found no face on astronaut"
    box = max(found, key=lambda d: d["width"] * d["height"])
    # The face is around rows 60–170, columns 170–280 of the photograph.
    assert 40 <= box["r"] <= 120 and 140 <= box["c"] <= 220 and 60 <= box["width"] <= 160
    # Crop with a margin (ArcFace crops show a little more than the detector's box), to 112.
    m = box["width"] // 4
    r0, c0 = max(box["r"] - m, 0), max(box["c"] - m, 0)
    side = box["width"] + 2 * m
    crop = photo[r0:r0 + side, c0:c0 + side]
    faces = [transform.resize(crop, (112, 112), anti_aliasing=True)]
    from dpface.data.align import ARCFACE_TEMPLATE, align_face

    # The IJB path's 5-point similarity alignment: the template's points placed in the
    # margin box are aligned by the box → 112 scaling, so the aligned face is the crop above.
    points = ARCFACE_TEMPLATE * side / 112.0 + [c0, r0]
    aligned = align_face(photo, points, 112)
    resized = (faces[0] * 255).round()
    assert aligned.shape == (112, 112, 3) and np.abs(aligned - resized).mean() < 12
    faces.append(aligned / 255.0)
    lfw = data.lfw_subset()[:n_lfw]  # the first 100 are faces: grey 25×25 in [0, 1]
    faces += [np.repeat(transform.resize(f, (112, 112), order=3)[..., None], 3, axis=2) for f in lfw]
    images = (np.clip(np.stack(faces), 0, 1) * 255).round().astype(np.uint8)  # [N,112,112,3]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), {"astronaut_box": box}


def test_real_faces_end_to_end_onnx_parity(exported):
    """detect (astronaut) / crop (LFW) → 112×112 → ONNX embedding (insightface input)
    equals dpface's own evaluation embedding of the same uint8 photographs."""
    from dpface.eval import extract_embeddings

    path, _, backbone, _ = exported
    images, _ = _real_faces()
    assert images.shape[0] == 10 and images.shape[1:] == (3, 112, 112) and images.dtype == torch.uint8
    assert images.float().std() > 20  # real photographs, not a blank crop
    session = xo.ort_session(path)

    def onnx_embed(u8):
        return torch.from_numpy(session.run(None, {"data": xo.insightface_normalize(u8).numpy()})[0])

    raw = onnx_embed(images)
    with torch.no_grad():
        ref = backbone.eval()(normalize(images))
    assert (F.normalize(raw, dim=1) - F.normalize(ref, dim=1)).abs().max() <= 1e-4
    # The deployed recipe (flip-sum, L2-normalise) reproduces dpface's eval embeddings.
    deployed = F.normalize(raw + onnx_embed(images.flip(-1)), dim=1)
    assert (deployed - extract_embeddings(backbone, images, flip=True)).abs().max() <= 1e-4


# -- model card ---------------------------------------------------------------------------
def test_train_writes_model_card_with_every_evaluation(run):
    card = json.loads((run / "model_card.json").read_text())
    md = (run / "MODEL_CARD.md").read_text()
    assert card["model"]["backbone"]["name"] == "iresnet_tiny" and card["model"]["embedding_size"] == 32
    assert card["head"]["num_classes"] == 12 and card["head"]["loss"]["name"] == "cosface"
    assert card["training"]["images_seen"] == 4 * 16 and card["training"]["world_size"] == 1
    assert card["training"]["wall_time_s"] > 0
    assert card["data"]["backend"] == "synthetic" and card["data"]["hash"].startswith("sha256:")
    train_evals = [e for e in card["evaluations"] if e["source"] == "dpface train"]
    assert [(e["kind"], e["step"]) for e in train_evals] == [("eval-untrained", 0), ("eval", 2), ("eval", 4)]
    final = json.loads((run / "final_metrics.json").read_text())
    assert train_evals[-1]["metrics"]["synthetic/acc"] == pytest.approx(final["synthetic/acc"])
    assert train_evals[0]["metrics"]["synthetic/acc"] == pytest.approx(final["untrained/synthetic/acc"])
    for title in ("### eval-untrained at step 0", "### eval at step 2", "### eval at step 4"):
        assert title in md
    assert "| set | acc | acc_std | auc | tar@far=0.1 | tar@far=0.01 |" in md
    assert f"| synthetic | {final['synthetic/acc']:.4f} |" in md
    assert "images seen: 64" in md and card["data"]["hash"] in md


def test_eval_appends_to_the_model_card(run, ckpt, capsys):
    before = json.loads((run / "model_card.json").read_text())
    assert main(["eval", "--checkpoint", str(ckpt)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    after = json.loads((run / "model_card.json").read_text())
    assert after["evaluations"][:-1] == before["evaluations"]
    added = after["evaluations"][-1]
    assert added["source"] == "dpface eval" and added["step"] == 4 and added["checkpoint"] == str(ckpt)
    assert added["metrics"]["synthetic/acc"] == pytest.approx(metrics["synthetic/acc"])
    md = (run / "MODEL_CARD.md").read_text()
    assert "### eval at step 4 (dpface eval)" in md and "### eval-untrained at step 0" in md


def test_card_keeps_appended_evals_and_wall_time_across_a_resume(run):
    from dpface.config import load_config

    cfg = load_config("configs/cpu_demo.yaml", TINY)
    previous = {"training": {"wall_time_s_total": 10.0},
                "evaluations": [{"source": "dpface train", "kind": "eval", "step": 2, "metrics": {}},
                                {"source": "dpface eval", "kind": "eval", "step": 2, "metrics": {"lfw/acc": 0.9}}]}
    card = mc.build_card(cfg, num_classes=12, num_params=1, step=4, world_size=2, wall_time_s=5.0,
                         checkpoint=None, evaluations=[{"source": "dpface train", "kind": "eval",
                                                        "step": 4, "metrics": {"a/acc": 1.0}}],
                         previous=previous)
    assert card["training"]["wall_time_s_total"] == 15.0 and card["training"]["images_seen"] == 4 * 16 * 2
    assert [e["source"] for e in card["evaluations"]] == ["dpface train", "dpface eval"]
    assert "| lfw | 0.9000 |" in mc.render_markdown(card)


def test_webdataset_manifest_hash(tmp_path):
    from dpface.config import load_config

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"num_images": 7, "num_classes": 3, "shards": []}))
    cfg = load_config("configs/cpu_demo.yaml", ["data.backend=webdataset",
                                                 f"data.shards.manifest={manifest}"])
    ident = mc.data_identity(cfg)
    assert ident["hash"] == "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert ident["num_images"] == 7 and ident["num_classes"] == 3
