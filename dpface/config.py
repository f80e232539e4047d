"""Typed configuration: dataclass schema, YAML recipes with `base:` inheritance,
dotted command-line overrides and strict validation.

Every error names the key and the file it came from, and suggests the closest valid
key for a typo. Backbone and loss specs are flat mappings (``{name: arcface, s: 64}``)
checked against their registries' constructor signatures.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dpface.registry import SpecError, closest


class ConfigError(ValueError):
    """A config file or override is invalid; the message names key and source."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` and ``1e6`` (no dot, or no exponent sign) as strings;
    people write them as floats, so they are resolved as floats here (YAML 1.2 rule)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


@dataclass
class ExperimentConfig:
    name: str = "dpface"
    output_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class HeadConfig:
    embedding_size: int = 512
    # Partial-FC share of each rank's negative classes kept per step, in (0, 1].
    sample_rate: float = 1.0
    # Which negatives fill the sample: uniform (Partial FC) or the highest-scoring ones
    # (DP-Softmax's dominant prototypes; scores every row of the shard, without grad).
    negatives: Literal["uniform", "hard"] = "uniform"
    # Which W rows the optimizer moves: all (dense gradient; unsampled rows still get
    # momentum and weight decay) or only the step's sampled rows (original Partial FC's
    # lazy update, much cheaper at small sample_rate; SGD only).
    update: Literal["dense", "sampled"] = "dense"
    # Margin-softmax implementation: the compiled fused op (kernels/, never materialises
    # the [B, K] logits), the PyTorch reference, or auto (fused where built and the loss
    # is one the op expresses; the trainer's start-up line says which).
    kernel: Literal["auto", "fused", "reference"] = "auto"
    # Head GEMM operands: fp32, or bf16 with fp32 accumulation (fused op only; softmax,
    # margin, parameters and optimizer state stay fp32).
    precision: Literal["fp32", "bf16"] = "fp32"
    # MiB of the step's logits the fused op may keep for backward; columns beyond it are
    # recomputed (one more GEMM over them) instead of stored.
    logits_budget_mb: int = 128
    loss: dict = field(default_factory=lambda: {"name": "arcface", "s": 64.0, "m": 0.5})


@dataclass
class SyntheticDataConfig:
    num_identities: int = 200
    max_images: int = 60
    min_images: int = 4
    exponent: float = 1.0
    difficulty: float = 1.0
    seed: int = 0


@dataclass
class WebDatasetConfig:
    shards: str = ""  # manifest.json of a converted dataset (see `dpface convert`)
    shuffle_buffer: int = 2000
    max_bad_fraction: float = 0.01
    augment: list = field(default_factory=lambda: ["flip"])


@dataclass
class DataConfig:
    backend: Literal["synthetic", "webdataset", "dali"] = "synthetic"
    batch_size: int = 64  # per rank
    # instance: shuffled images; pk: P identities × K images per batch (batch_size = P·K),
    # for range/triplet/contrastive losses that need several images per identity.
    sampler: Literal["instance", "pk"] = "instance"
    pk_images: int = 4  # K of the P×K sampler
    num_workers: int = 2
    image_size: int = 112
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    webdataset: WebDatasetConfig = field(default_factory=WebDatasetConfig)


@dataclass
class TrainConfig:
    steps: int = 1000
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    head_lr: float = 0.0  # 0: same as lr
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = 2.0
    min_lr: float = 0.0
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    grad_clip: float = 5.0  # max global grad norm; 0 disables
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    ckpt_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    # Stop when this many consecutive steps were skipped for non-finite gradients.
    max_skipped_steps: int = 20


@dataclass
class EvalConfig:
    num_identities: int = 100  # held-out synthetic identities (disjoint from training)
    num_pairs: int = 600
    folds: int = 10
    flip: bool = True
    batch_size: int = 128
    fars: list = field(default_factory=lambda: [0.1, 0.01])
    bin_sets: list = field(default_factory=list)  # insightface-format .bin files


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "dpface"
    name: str = ""
    group: str = ""
    tags: list = field(default_factory=list)


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO for the backbone only; the model-parallel head stays a plain torch
    module and optimizer (its shards must not be averaged across ranks). Precision
    follows train.amp (bf16/fp16 become DeepSpeed's own mixed precision)."""
    enabled: bool = False
    zero_stage: int = 1  # 1: optimizer state sharded; 2: + gradients sharded
    bucket_mb: int = 200  # reduce / all-gather bucket size (MB of fp32 elements)
    overlap_comm: bool = False  # overlap gradient reduction with backward (GPU)
    extra: dict = field(default_factory=dict)  # raw DeepSpeed keys, merged over the generated config


@dataclass
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    model: dict = field(default_factory=lambda: {"name": "iresnet50"})
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # Embedding losses added to the classification loss: [{name: range, weight: 0.1, ...}].
    aux_losses: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Range checks: key -> (predicate, description). Kept in one table so every rule
# is visible in one place.
_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "head.embedding_size": (lambda v: v > 0, "> 0"),
    "head.sample_rate": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "head.logits_budget_mb": (lambda v: v >= 0, ">= 0"),
    "data.batch_size": (lambda v: v > 0, "> 0"),
    "data.num_workers": (lambda v: v >= 0, ">= 0"),
    "data.pk_images": (lambda v: v >= 1, ">= 1"),
    "data.image_size": (lambda v: v >= 16 and v % 16 == 0, "a multiple of 16, >= 16"),
    "data.synthetic.num_identities": (lambda v: v >= 2, ">= 2"),
    "data.synthetic.min_images": (lambda v: v >= 1, ">= 1"),
    "data.synthetic.difficulty": (lambda v: v >= 0, ">= 0"),
    "data.webdataset.max_bad_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "train.steps": (lambda v: v > 0, "> 0"),
    "train.lr": (lambda v: v > 0, "> 0"),
    "train.head_lr": (lambda v: v >= 0, ">= 0"),
    "train.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.weight_decay": (lambda v: v >= 0, ">= 0"),
    "train.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "train.poly_power": (lambda v: v >= 0, ">= 0"),
    "train.min_lr": (lambda v: v >= 0, ">= 0"),
    "train.grad_clip": (lambda v: v >= 0, ">= 0"),
    "train.log_every": (lambda v: v > 0, "> 0"),
    "train.eval_every": (lambda v: v >= 0, ">= 0"),
    "train.ckpt_every": (lambda v: v >= 0, ">= 0"),
    "train.keep_checkpoints": (lambda v: v >= 1, ">= 1"),
    "eval.num_identities": (lambda v: v >= 2, ">= 2"),
    "eval.num_pairs": (lambda v: v >= 2 and v % 2 == 0, "even and >= 2"),
    "eval.folds": (lambda v: v >= 2, ">= 2"),
    "eval.batch_size": (lambda v: v > 0, "> 0"),
    "eval.fars": (lambda v: all(not isinstance(f, bool) and isinstance(f, (int, float)) and 0 < f <= 1
                                for f in v), "a list of numbers in (0, 1]"),
    "deepspeed.zero_stage": (lambda v: v in (1, 2),
                             "1 or 2 (ZeRO-3 would shard the backbone's weights, which evaluation reads whole)"),
    "deepspeed.bucket_mb": (lambda v: v > 0, "> 0"),
}


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp in (str, bool, list, dict):
        return isinstance(value, tp), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    raise TypeError(f"unsupported annotation {tp}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _build(cls, data: Any, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(
                f"{source}: unknown key '{where}'{closest(key, names)}; valid keys here: {', '.join(names)}"
            )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp, value = hints[name], data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key, source)
            continue
        ok, value = _type_ok(value, tp)
        if not ok:
            raise ConfigError(
                f"{source}: '{key}' expects {_type_name(tp)}, got {type(data[name]).__name__} {data[name]!r}"
            )
        rule = _RULES.get(key)
        if rule and not rule[0](value):
            raise ConfigError(f"{source}: '{key}' must be {rule[1]}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


# Component specs are replaced whole by a derived recipe, never merged: parameters
# of the base's component would not fit another component.
SPEC_KEYS = ("model", "head.loss")


def _merge(base: dict, over: dict, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and isinstance(out.get(k), dict) and key not in SPEC_KEYS:
            out[k] = _merge(out[k], v, key)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read a recipe, resolving its ``base:`` (a path relative to the file)."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: 'base' chain loops: {' -> '.join(map(str, chain + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a path string")
    return _merge(_read_yaml(path.parent / base, chain + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=0.05' -> (['train', 'lr'], 0.05); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': bad key '{key}'")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': cannot parse value: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides) -> dict:
    """Set each 'a.b.c=value' in the nested mapping ``data`` (in place)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section")
        node[keys[-1]] = value
    return data


# Filled in by the trainer, never by a config.
AUX_PROVIDED = ("num_classes", "embedding_size")


def _check_spec_types(registry, spec: dict, key: str, source: str) -> None:
    """Type-check a spec's parameters against the constructor's annotations (scalar
    ones; others are left to the constructor), recursing into nested specs (``base``)."""
    fn = registry.get(spec["name"])
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # noqa: BLE001 — unresolvable annotations: nothing to check against
        hints = {}
    for name, value in spec.items():
        tp = hints.get(name)
        if isinstance(value, dict) and value.get("name") in registry:
            _check_spec_types(registry, value, f"{key}.{name}", source)
            continue
        if name == "name" or tp is None:
            continue
        scalar = {float, int, bool, str}
        args = set(typing.get_args(tp)) - {type(None)}
        if tp in scalar or (typing.get_origin(tp) in (typing.Union, types.UnionType) and args <= scalar):
            if not _type_ok(value, tp)[0] and not (value is None and type(None) in typing.get_args(tp)):
                raise ConfigError(f"{source}: '{key}.{name}' expects {_type_name(tp)}, "
                                  f"got {type(value).__name__} {value!r}")


def _check_specs(cfg: Config, source: str) -> None:
    # Imported here: the registries pull in torch models, which config parsing alone
    # (e.g. `dpface plan`) does not need.
    from dpface.losses import AUX_LOSSES, LOSSES
    from dpface.models import BACKBONES

    for i, spec in enumerate(cfg.aux_losses):
        key = f"aux_losses[{i}]"
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"{source}: '{key}' must be a mapping with a 'name'; "
                              f"valid: {', '.join(AUX_LOSSES.names()) or '(none registered)'}")
        weight = spec.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ConfigError(f"{source}: '{key}.weight' must be a number > 0, got {weight!r}")
        params = {k: v for k, v in spec.items() if k not in ("name", "weight")}
        try:
            AUX_LOSSES.check(spec["name"], params, provided=AUX_PROVIDED)
        except SpecError as e:
            raise ConfigError(f"{source}: '{key}': {e}") from None

    for key, spec, registry, provided in (
        ("model", cfg.model, BACKBONES, ("embedding_size",)),
        ("head.loss", cfg.head.loss, LOSSES, ()),
    ):
        if "name" not in spec:
            raise ConfigError(f"{source}: '{key}' needs a 'name'; valid: {', '.join(registry.names())}")
        params = {k: v for k, v in spec.items() if k != "name"}
        try:
            registry.check(spec["name"], params, provided=provided)
        except SpecError as e:
            raise ConfigError(f"{source}: '{key}': {e}") from None
        _check_spec_types(registry, spec, key, source)
    # Range checks live in the loss constructors; building the (small) loss once here
    # turns them into a load-time error naming key and file instead of a traceback later.
    try:
        LOSSES.build(cfg.head.loss)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: 'head.loss': {e}") from None
    # Backbones take a fixed input side (a constructor parameter, default 112).
    p = BACKBONES.parameters(cfg.model["name"]).get("input_size")
    side = cfg.model.get("input_size", p.default if p is not None else None)
    if side is not None and side != cfg.data.image_size:
        raise ConfigError(f"{source}: 'data.image_size' is {cfg.data.image_size} but backbone "
                          f"'{cfg.model['name']}' takes {side}-pixel input; set both "
                          f"(e.g. data.image_size={cfg.data.image_size} and model.input_size="
                          f"{cfg.data.image_size})")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a recipe (or the defaults), apply dotted overrides, validate everything."""
    data = _read_yaml(Path(path)) if path else {}
    # Start from the schema's defaults so a dotted override of one spec parameter
    # (head.loss.s=30) lands in a complete spec.
    data = _merge(Config().to_dict(), data)
    source = str(path) if path else "<defaults>"
    apply_overrides(data, overrides)
    if overrides:
        source += " (with overrides " + " ".join(overrides) + ")"
    return config_from_dict(data, source)


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Validate a plain mapping (e.g. the config stored in a checkpoint)."""
    cfg = _build(Config, _merge(Config().to_dict(), data), "", source)
    _check_specs(cfg, source)
    d, t = cfg.data, cfg.train
    if t.min_lr > min(t.lr, t.head_lr or t.lr):
        raise ConfigError(f"{source}: 'train.min_lr' ({t.min_lr}) must not exceed 'train.lr' "
                          f"({t.lr}) or 'train.head_lr' ({t.head_lr or t.lr})")
    if d.sampler == "pk":
        if d.backend != "synthetic":
            raise ConfigError(f"{source}: 'data.sampler: pk' needs an indexable data set "
                              f"(data.backend: synthetic), not '{d.backend}'")
        if d.batch_size % d.pk_images:
            raise ConfigError(f"{source}: 'data.batch_size' ({d.batch_size}) must be a multiple "
                              f"of 'data.pk_images' ({d.pk_images}) with data.sampler: pk")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
