"""The model card of a run: ``MODEL_CARD.md`` and its JSON twin ``model_card.json`` in the run
directory.

``dpface train`` writes both at the end of a finished run (rank 0): backbone, embedding size,
classes, images seen, the data's identity (the manifest's SHA-256 for WebDataset/DALI data,
a hash of the generator's parameters for synthetic data), loss and head settings, world
size, wall time, and every evaluation table of the run (``eval-untrained``, periodic and
final ``eval`` rows of metrics.jsonl). ``dpface eval`` appends its results. The JSON is the
record; the Markdown is rendered from it each time, so an append never loses earlier tables.

Metric keys are ``<set>/<metric>`` (``synthetic/acc``, ``lfw/tar@far=0.01``); a table per
evaluation has one row per set and one column per metric, so protocols that add their own
metrics (IJB, identification) show up without changes here.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from pathlib import Path

from dpface.io import atomic_write_text
from dpface.rundir import RunDir

SCHEMA = 1


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def data_identity(cfg) -> dict:
    """What data the run saw, with a hash that changes when the data does.

    synthetic: SHA-256 of the generator's parameters (canonical JSON of data.synthetic and
    the image size); webdataset/dali: SHA-256 of manifest.json (a shard pattern without a
    manifest: of the sorted shard names and sizes)."""
    d = cfg.data
    if d.backend == "synthetic":
        params = {"synthetic": dict(vars(d.synthetic)), "image_size": d.image_size}
        blob = json.dumps(params, sort_keys=True).encode()
        return {"backend": "synthetic", "parameters": params,
                "hash": "sha256:" + hashlib.sha256(blob).hexdigest(), "hash_of": "generator parameters"}
    if d.sources:  # several data sets: each one's identity, its weight and its labels' offset
        parts, offset = [], 0
        for s in d.sources:
            one = _shards_identity(d.backend, s["manifest"])
            parts.append({**one, "weight": s["weight"], "label_offset": offset})
            offset += int(one.get("num_classes") or 0)
        blob = json.dumps([[p.get("hash"), p["weight"]] for p in parts]).encode()
        return {"backend": d.backend, "sources": parts, "num_classes": offset,
                "num_images": sum(int(p.get("num_images") or 0) for p in parts),
                "hash": "sha256:" + hashlib.sha256(blob).hexdigest(), "hash_of": "the sources' hashes and weights"}
    return _shards_identity(d.backend, d.shards.manifest)


def _shards_identity(backend: str, spec: str) -> dict:
    """A shard data set's identity: the hash of its manifest (a shard pattern without one:
    of the sorted shard names and sizes), its image and class counts."""
    from dpface.data.formats.shards import manifest_hash

    out = {"backend": backend, "shards": spec}
    try:
        p = Path(spec)
        manifest = p / "manifest.json" if p.is_dir() else p
        if manifest.suffix == ".json" and manifest.is_file():
            out.update(hash=manifest_hash(manifest), hash_of=str(manifest))
            m = json.loads(manifest.read_text())
            out.update(num_images=m.get("num_images"), num_classes=m.get("num_classes"))
        else:
            import braceexpand

            tars = sorted(braceexpand.braceexpand(spec))
            listing = [[os.path.basename(t), os.path.getsize(t)] for t in tars if os.path.exists(t)]
            out.update(hash="sha256:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
                       hash_of=f"names and sizes of {len(listing)} shard(s)")
    except (OSError, ValueError) as e:
        out.update(hash=None, hash_of=f"unreadable: {e}")
    return out


def eval_tables_from_metrics(metrics_jsonl: Path) -> list[dict]:
    """Every evaluation row (kind eval*) of a run's metrics.jsonl, in order."""
    out = []
    if not metrics_jsonl.is_file():
        return out
    for line in metrics_jsonl.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        kind = str(row.get("kind", ""))
        if not kind.startswith("eval"):
            continue
        metrics = {k: v for k, v in row.items() if k not in ("step", "kind")}
        out.append({"source": "dpface train", "kind": kind, "step": row.get("step"), "metrics": metrics})
    return out


def build_card(cfg, *, num_classes: int, num_params: int, step: int, world_size: int,
               wall_time_s: float, checkpoint: str | None, evaluations: list[dict],
               previous: dict | None = None, ran: dict | None = None, init_from: dict | None = None) -> dict:
    """The card of a finished training run. ``previous`` (the card of the run this one
    resumed, if any) contributes its wall time and the evaluations of `dpface eval`."""
    global_batch = cfg.data.batch_size * world_size
    ran = ran or {}  # what the run resolved "auto" to (the head's kernel, the AMP dtype)
    kernel = ran.get("kernel") or cfg.head.kernel
    amp = ran.get("amp") or cfg.train.amp
    prev_wall = float((previous or {}).get("training", {}).get("wall_time_s_total", 0.0) or 0.0)
    appended = [e for e in (previous or {}).get("evaluations", []) if e.get("source") != "dpface train"]
    from dpface import __version__

    return {
        "schema": SCHEMA,
        "run": cfg.experiment.name,
        "written": _now(),
        "dpface_version": __version__,
        "model": {"backbone": cfg.model, "parameters": num_params,
                  "embedding_size": cfg.head.embedding_size, "image_size": cfg.data.image_size,
                  "input": "RGB, (pixel - 127.5) / 127.5, aligned face crops"},
        "head": {"num_classes": num_classes, "loss": cfg.head.loss,
                 "sample_rate": cfg.head.sample_rate, "negatives": cfg.head.negatives,
                 "update": cfg.head.update, "kernel": kernel, "precision": cfg.head.precision,
                 "aux_losses": list(cfg.aux_losses)},
        "data": data_identity(cfg),
        "training": {"steps": step, "images_seen": step * global_batch, "global_batch": global_batch,
                     "world_size": world_size, "optimizer": cfg.train.optimizer, "lr": cfg.train.lr,
                     "schedule": cfg.train.schedule, "amp": amp,
                     "deepspeed": bool(cfg.deepspeed.enabled),
                     "wall_time_s": round(wall_time_s, 3),
                     "wall_time_s_total": round(prev_wall + wall_time_s, 3),
                     "checkpoint": checkpoint, "init_from": init_from},
        "evaluations": list(evaluations) + appended,
    }


def read_card(run_dir: Path) -> dict | None:
    p = RunDir(run_dir).card_json
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_card(run_dir: Path, card: dict) -> None:
    """Both files, each written to a temp name and renamed (a crash never leaves half a card)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in ((RunDir.CARD_JSON, json.dumps(_clean(card), indent=1, allow_nan=False) + "\n"),
                       (RunDir.CARD_MD, render_markdown(card))):
        atomic_write_text(run_dir / name, text)


def append_evaluation(run_dir: Path, metrics: dict, *, source: str = "dpface eval",
                      step: int | None = None, checkpoint: str | None = None,
                      kind: str = "eval", fallback: dict | None = None, note: str | None = None) -> dict:
    """Add one evaluation table to the run's card. Without a card yet (a run from before
    model cards, or still training), one is started from ``fallback`` (header fields)."""
    card = read_card(run_dir) or {"schema": SCHEMA, "run": Path(run_dir).name, **(fallback or {}),
                                  "evaluations": []}
    entry = {"source": source, "kind": kind, "step": step, "time": _now(), "metrics": dict(metrics)}
    if checkpoint:
        entry["checkpoint"] = checkpoint
    if note:
        entry["note"] = note
    card.setdefault("evaluations", []).append(entry)
    write_card(run_dir, card)
    return card


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# -- Markdown ---------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def metrics_table(metrics: dict) -> str:
    """``<set>/<metric>`` → one row per set, one column per metric (Markdown); the set is
    everything before the last '/' (``ijb/B/flip+norm/tar@far=1e-4``: row ``ijb/B/flip+norm``)."""
    sets: dict[str, dict] = {}
    columns: list[str] = []
    for key, value in metrics.items():
        name, _, metric = key.rpartition("/")
        if not metric:
            name, metric = "", key
        sets.setdefault(name, {})[metric] = value
        if metric not in columns:
            columns.append(metric)
    lines = ["| set | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in sets.items():
        lines.append(f"| {name or '–'} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def render_markdown(card: dict) -> str:
    m, h, d, t = (card.get(k) or {} for k in ("model", "head", "data", "training"))
    out = [f"# Model card: {card.get('run', '?')}", ""]
    if card.get("written"):
        out += [f"Written by dpface {card.get('dpface_version', '')} at {card['written']}.", ""]
    if m:
        out += ["## Model", "",
                f"- backbone: `{_fmt(m.get('backbone'))}` ({_fmt(m.get('parameters'))} parameters)",
                f"- embedding size: {m.get('embedding_size')}",
                f"- input: {m.get('image_size')}×{m.get('image_size')}, {m.get('input', '')}", ""]
    if h:
        out += ["## Head and loss", "",
                f"- classes: {h.get('num_classes')}",
                f"- loss: `{_fmt(h.get('loss'))}`",
                f"- sample rate {h.get('sample_rate')}, negatives {h.get('negatives')}, "
                f"update {h.get('update')}, kernel {h.get('kernel')}, precision {h.get('precision')}"]
        if h.get("aux_losses"):
            out.append(f"- auxiliary losses: `{_fmt(h['aux_losses'])}`")
        out.append("")
    if d:
        out += ["## Data", "", f"- backend: {d.get('backend')}"]
        if d.get("parameters"):
            out.append(f"- parameters: `{_fmt(d['parameters'])}`")
        if d.get("shards"):
            out.append(f"- shards: `{d['shards']}`")
        for i, s in enumerate(d.get("sources") or []):
            lo = s.get("label_offset", 0)
            out.append(f"- source {i}: `{s.get('shards')}`, weight {s.get('weight')}, labels [{lo}, "
                       f"{lo + int(s.get('num_classes') or 0)}), {s.get('num_images')} images, hash `{s.get('hash')}`")
        out += [f"- data hash: `{d.get('hash')}` (of {d.get('hash_of')})", ""]
    if t:
        out += ["## Training", "",
                f"- steps: {t.get('steps')}, images seen: {t.get('images_seen')} "
                f"(global batch {t.get('global_batch')})",
                f"- world size: {t.get('world_size')}",
                f"- optimizer {t.get('optimizer')}, lr {t.get('lr')}, schedule {t.get('schedule')}, "
                f"amp {t.get('amp')}{', DeepSpeed' if t.get('deepspeed') else ''}",
                f"- wall time: {_fmt(t.get('wall_time_s'))} s (this session), "
                f"{_fmt(t.get('wall_time_s_total'))} s (all sessions)",
                f"- final checkpoint: `{t.get('checkpoint')}`"]
        src = t.get("init_from")
        if src:
            step = f", step {src.get('step')}" if src.get("step") is not None else ""
            out.append(f"- started from: `{src.get('path')}` ({src.get('kind')}{step}; data hash "
                       f"`{src.get('data_hash')}`; head {src.get('head')})")
        out.append("")
    evals = card.get("evaluations") or []
    out += ["## Evaluations", ""]
    if not evals:
        out += ["(none)", ""]
    for e in evals:
        title = f"### {e.get('kind', 'eval')} at step {e.get('step')} ({e.get('source', '')})"
        out += [title, ""]
        if e.get("checkpoint"):
            out += [f"checkpoint `{e['checkpoint']}`" + (f", {e['time']}" if e.get("time") else ""), ""]
        if e.get("note"):
            out += [e["note"], ""]
        out += [metrics_table(e.get("metrics") or {}), ""]
    return "\n".join(out)


def write_training_card(trainer, checkpoint, wall_time_s: float) -> Path | None:
    """The trainer's end-of-run hook (rank 0, after final_metrics.json): the card of the run
    from the trainer's state and its metrics.jsonl. A failure to write it warns and returns
    None: the run itself is complete and checkpointed by then."""
    import warnings

    run_dir = Path(trainer.run_dir)
    try:
        previous = read_card(run_dir) if trainer.resume_from is not None else None
        card = build_card(trainer.cfg, num_classes=int(trainer.head.num_classes),
                          num_params=sum(p.numel() for p in trainer.backbone.parameters()),
                          step=int(trainer.state.step), world_size=int(trainer.info.world_size),
                          wall_time_s=float(wall_time_s),
                          checkpoint=str(checkpoint) if checkpoint else None,
                          evaluations=eval_tables_from_metrics(RunDir(run_dir).metrics_file),
                          previous=previous, init_from=getattr(trainer, "init_from", None),
                          ran={"kernel": getattr(trainer, "head_kernel", None),
                               "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "fp32"})
        write_card(run_dir, card)
        return RunDir(run_dir).card_md
    except Exception as e:  # noqa: BLE001 — the card must never fail a finished run
        warnings.warn(f"model card not written to {run_dir}: {type(e).__name__}: {e}")
        return None


def card_header_from_config(cfg, step: int | None = None) -> dict:
    """Header fields for a card that `dpface eval` starts (the run has none yet)."""
    return {"written": _now(), "model": {"backbone": cfg.model, "embedding_size": cfg.head.embedding_size,
                                        "image_size": cfg.data.image_size,
                                        "input": "RGB, (pixel - 127.5) / 127.5, aligned face crops"},
            "head": {"loss": cfg.head.loss, "sample_rate": cfg.head.sample_rate,
                     "negatives": cfg.head.negatives, "update": cfg.head.update,
                     "kernel": cfg.head.kernel, "precision": cfg.head.precision,
                     "aux_losses": list(cfg.aux_losses)},
            "data": data_identity(cfg)}


def append_checkpoint_evaluation(ckpt: Path, cfg, meta: dict, metrics: dict,
                                 note: str | None = None) -> Path | None:
    """`dpface eval`'s hook: the results go into the card of the run the checkpoint belongs
    to (``<run>/checkpoints/step-N`` → ``<run>/MODEL_CARD.md``). A checkpoint outside a run
    directory, or a card that cannot be written, warns and returns None: the results are
    on stdout either way."""
    import warnings

    ckpt = Path(ckpt)
    if not RunDir.in_run(ckpt):
        return None
    run_dir = RunDir.of_checkpoint(ckpt).root
    try:
        append_evaluation(run_dir, metrics, step=meta.get("step"), checkpoint=str(ckpt),
                          fallback=card_header_from_config(cfg, meta.get("step")), note=note)
        return RunDir(run_dir).card_md
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"model card in {run_dir} not updated: {type(e).__name__}: {e}")
        return None
