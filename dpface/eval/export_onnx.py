"""A checkpoint's backbone as an ONNX model that insightface-style inference code can run.

The exported graph:

    input  ``data``       float32 [N, 3, S, S] (N dynamic; S = the checkpoint's data.image_size,
                          112 for every shipped recipe), RGB, CHW, aligned face crops,
                          normalised as (pixel − 127.5) / 127.5
    output ``embedding``  float32 [N, D], the raw embedding (not L2-normalised; insightface's
                          models output it raw as well — normalise before cosine matching)

dpface's own convention (dpface/data/transforms.py) is the same normalisation; were it ever
changed, the export puts a conversion from the insightface convention into the graph
(``InsightfaceInput``), so the ONNX input stays the insightface one either way.

The exporter is torch's dynamo-based one (``torch.onnx.export(..., dynamo=True)``, the one
torch 2.13 recommends; it needs ``onnx`` and ``onnxscript``). Right after export the file
is checked with onnxruntime against the PyTorch backbone on images of the checkpoint's
evaluation set (held-out synthetic identities, or the first .bin set) and on random inputs;
the largest |Δ| of the L2-normalised embeddings (what matching uses; scale-free, so one
tolerance fits every backbone) must stay within ``tol`` (1e-4 in fp32), the raw-output |Δ|
is reported beside it. The file is written under a temporary name and renamed only once the
check passed; a failing export stays beside it as ``<out>.unverified``.

Opset, preprocessing, embedding size, backbone and the source checkpoint are written into the
model's ``metadata_props``.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dpface.data import transforms

INSIGHTFACE_MEAN = INSIGHTFACE_STD = 127.5
PREPROCESSING = ("RGB, CHW, float32, (pixel - 127.5) / 127.5 (insightface convention); "
                 "face aligned to the ArcFace 5-point template, {s}x{s}")
DEFAULT_TOL = 1e-4


class ExportError(RuntimeError):
    """The exported model does not match the PyTorch backbone (or cannot be exported)."""


class InsightfaceInput(torch.nn.Module):
    """Takes insightface-normalised input, feeds the backbone dpface's normalisation.

    x_if = (p − 127.5)/127.5  ⇒  p = 127.5·x_if + 127.5  ⇒  x_dp = (p − MEAN)/STD.
    Only used when dpface's MEAN/STD differ from insightface's (they do not today)."""

    def __init__(self, backbone: torch.nn.Module, mean: float, std: float):
        super().__init__()
        self.backbone, self.mean, self.std = backbone, float(mean), float(std)

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        pixels = data * INSIGHTFACE_STD + INSIGHTFACE_MEAN
        return self.backbone((pixels - self.mean) / self.std)


def onnx_input_module(backbone: torch.nn.Module) -> torch.nn.Module:
    """The module to export: the backbone itself when dpface normalises as insightface
    does, else the backbone behind the conversion."""
    if transforms.MEAN == INSIGHTFACE_MEAN and transforms.STD == INSIGHTFACE_STD:
        return backbone
    return InsightfaceInput(backbone, transforms.MEAN, transforms.STD)


def insightface_normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] → what the ONNX input ``data`` expects."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return (images.float() - INSIGHTFACE_MEAN) / INSIGHTFACE_STD


def check_images(cfg, n: int = 64) -> tuple[torch.Tensor, str]:
    """Up to ``n`` uint8 [n,3,S,S] images of the checkpoint's evaluation set and its name:
    the held-out synthetic identities, else the first .bin set."""
    if cfg.data.backend == "synthetic":
        from dpface.data.synthetic.pairs import make_verification_pairs

        s = cfg.data.synthetic
        folds = cfg.eval.folds
        pairs = max(2 * folds, (n // 2 + 2 * folds - 1) // (2 * folds) * 2 * folds)
        p = make_verification_pairs(num_pairs=pairs, identity_offset=s.num_identities,
                                    num_identities=cfg.eval.num_identities, seed=s.seed,
                                    image_size=cfg.data.image_size, difficulty=s.difficulty,
                                    num_folds=folds)
        images = torch.cat([torch.as_tensor(p.images_a), torch.as_tensor(p.images_b)])[:n]
        return _nchw(images), "synthetic eval pairs"
    if cfg.eval.bin_sets:
        from dpface.eval.bin_sets import load_bin

        path = cfg.eval.bin_sets[0]
        try:
            a, b, _ = load_bin(path, image_size=cfg.data.image_size)
        except (ValueError, OSError) as e:  # missing / unreadable: bad input (exit 2)
            from dpface.schema import ConfigError

            raise ConfigError(f"eval.bin_sets: {path}: {e}") from e
        return _nchw(torch.cat([torch.as_tensor(a), torch.as_tensor(b)])[:n]), Path(path).name
    raise ExportError("no evaluation images to check the export on: the checkpoint's config has "
                      "no synthetic data and no eval.bin_sets (add the override "
                      "eval.bin_sets=[path/to/lfw.bin])")


def _nchw(images: torch.Tensor) -> torch.Tensor:
    if images.ndim == 4 and images.shape[1] != 3 and images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    return images.contiguous()


# -- export and check --------------------------------------------------------------------
@dataclass
class ExportReport:
    path: Path
    opset: int
    export_s: float
    checks: dict = field(default_factory=dict)  # name → {"n", "max_abs_diff", "max_abs_diff_raw"}
    metadata: dict = field(default_factory=dict)

    @property
    def max_abs_diff(self) -> float:
        return max((c["max_abs_diff"] for c in self.checks.values()), default=float("nan"))


def export(module: torch.nn.Module, out: Path | str, image_size: int = 112,
           metadata: dict | None = None, opset: int | None = None) -> tuple[int, float]:
    """Export ``module`` (eval mode, CPU, fp32) with input ``data`` [N,3,S,S] (N dynamic) and
    output ``embedding``; ``metadata`` (str → str) goes into metadata_props with the opset and
    the preprocessing. Returns (opset, seconds)."""
    try:
        import onnx  # noqa: F401  (the exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs onnx and onnxscript: pip install 'dpface[onnx]' ({e})") from None
    from dpface.models.quality import QualityAware, QualityOutputs

    out = Path(out)
    module = module.eval().float().cpu()
    outputs = ["embedding"]
    if isinstance(module, QualityAware):  # a qan backbone also exports its quality score
        module, outputs = QualityOutputs(module), ["embedding", "quality"]
    x = torch.zeros(2, 3, image_size, image_size)
    t0 = time.perf_counter()
    # The exporter logs one line per missing torchvision op and a banner per stage.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            kw = {} if opset is None else {"opset_version": opset}
            prog = torch.onnx.export(
                module, (x,), input_names=["data"], output_names=outputs,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True,
                verbose=False, **kw)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed for {type(module).__name__}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        quiet.setLevel(level)
    model = prog.model_proto
    elapsed = time.perf_counter() - t0
    used = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)
    props = {"opset": str(used), "preprocessing": PREPROCESSING.format(s=image_size),
             "input": f"data: float32 [N,3,{image_size},{image_size}], N dynamic",
             "output": "embedding: float32 [N,D], not L2-normalised" + (
                 "; quality: float32 [N], > 0, the image's weight in quality-aware set pooling"
                 if "quality" in outputs else ""),
             "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=True)",
             **{k: str(v) for k, v in (metadata or {}).items()}}
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return used, elapsed


def ort_session(path: Path | str):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError(f"the check after export needs onnxruntime: pip install 'dpface[onnx]' ({e})") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare(session, module: torch.nn.Module, data: torch.Tensor, batch_size: int = 16) -> dict:
    """onnxruntime vs PyTorch on ``data`` (already in the ONNX input convention)."""
    ort_out, ref = [], []
    module = module.eval()
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x = data[i:i + batch_size].float().contiguous()
            ort_out.append(torch.from_numpy(session.run(["embedding"], {"data": x.numpy()})[0]))
            ref.append(module(x).float())
    o, r = torch.cat(ort_out), torch.cat(ref)
    if o.shape != r.shape:
        raise ExportError(f"onnxruntime output shape {tuple(o.shape)} != PyTorch {tuple(r.shape)}")
    return {"n": len(data),
            "max_abs_diff": float((F.normalize(o, dim=1) - F.normalize(r, dim=1)).abs().max()),
            "max_abs_diff_raw": float((o - r).abs().max()),
            "max_abs_raw": float(r.abs().max())}


def verify(path: Path | str, module: torch.nn.Module, images: dict, tol: float = DEFAULT_TOL) -> dict:
    """``images``: name → input in the ONNX convention. Raises ExportError when any
    normalised-embedding |Δ| exceeds ``tol``."""
    session = ort_session(path)
    checks = {name: compare(session, module, x) for name, x in images.items()}
    bad = {k: c for k, c in checks.items() if not c["max_abs_diff"] <= tol}
    if bad:
        worst = max(bad, key=lambda k: bad[k]["max_abs_diff"])
        raise ExportError(f"onnxruntime disagrees with PyTorch on {worst}: max |Δ| "
                          f"{bad[worst]['max_abs_diff']:.3g} > {tol:g} (L2-normalised embeddings, fp32)")
    return checks


def export_checkpoint(restored, out: Path | str, tol: float = DEFAULT_TOL,
                      num_images: int = 64, opset: int | None = None) -> ExportReport:
    """Export a restored checkpoint's backbone (``dpface.restore.load_backbone``) to ``out``
    and check it (module docstring)."""
    backbone, cfg, meta, ckpt = restored
    ckpt, out = Path(ckpt), Path(out)
    size = cfg.data.image_size
    module = onnx_input_module(backbone)
    n_params = sum(p.numel() for p in backbone.parameters())
    metadata = {"framework": "dpface", "backbone": json.dumps(cfg.model, sort_keys=True),
                "embedding_size": cfg.head.embedding_size, "image_size": size,
                "parameters": n_params, "checkpoint": str(ckpt.resolve()),
                "step": meta.get("step", ""), "loss": json.dumps(cfg.head.loss, sort_keys=True)}
    real, real_name = check_images(cfg, num_images)  # before the export: fail fast without them
    tmp = out.with_name(out.name + ".partial")
    opset_used, seconds = export(module, tmp, size, metadata, opset)
    g = torch.Generator().manual_seed(0)
    inputs = {f"{len(real)} images of {real_name}": insightface_normalize(real),
              "8 random inputs": torch.rand(8, 3, size, size, generator=g) * 2 - 1}
    try:
        checks = verify(tmp, module, inputs, tol)
    except ExportError as e:
        bad = out.with_name(out.name + ".unverified")
        os.replace(tmp, bad)
        raise ExportError(f"{e}; the unverified model is kept at {bad}") from None
    os.replace(tmp, out)
    return ExportReport(out, opset_used, seconds, checks, metadata)


def read_metadata(path: Path | str) -> dict:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
