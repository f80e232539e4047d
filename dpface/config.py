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
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dpface.data.config import DataConfig, ShardsConfig, SyntheticDataConfig
from dpface.eval.config import EvalConfig
from dpface.heads.config import HeadConfig
from dpface.registry import SpecError
from dpface.schema import ConfigError, Invalid, at_least, build_section, non_negative, positive, rule, type_name
from dpface.schema import type_ok as _type_ok


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` and ``1e6`` (no dot, or no exponent sign) as strings;
    people write them as floats, so they are resolved as floats here (YAML 1.2 rule)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _run_name_ok(name: str) -> bool:
    """One directory name inside output_dir: not empty, no separator, not '.' or '..'."""
    return bool(name.strip()) and "/" not in name and "\\" not in name and name not in (".", "..") \
        and not name.startswith("~") and "\0" not in name


@dataclass
class ExperimentConfig:
    # runs/<name>/ holds the run: one directory name, never a path out of output_dir
    name: str = rule("dpface", _run_name_ok, "a single directory name (no '/', not empty, '.' or '..')")
    output_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class TrainConfig:
    # The run's length: steps, or epochs (passes over the data: steps = ceil(epochs × images
    # / global batch), accumulation included). Exactly one is set; a layer (recipe, --set
    # overrides) that sets one clears the other inherited from below it.
    steps: int = non_negative(1000)
    epochs: float = non_negative(0.0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = positive(0.1)
    head_lr: float = non_negative(0.0)  # 0: same as lr
    momentum: float = rule(0.9, lambda v: 0 <= v < 1, "in [0, 1)")
    weight_decay: float = non_negative(5e-4)
    warmup_steps: int = non_negative(0)
    warmup_epochs: float = non_negative(0.0)  # the alternative to warmup_steps
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = non_negative(2.0)
    min_lr: float = non_negative(0.0)
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    grad_clip: float = non_negative(5.0)  # max global grad norm; 0 disables
    log_every: int = positive(10)
    eval_every: int = non_negative(0)  # 0: only at the end
    ckpt_every: int = non_negative(0)  # 0: only at the end
    keep_checkpoints: int = at_least(2, 1)
    # Stop when this many consecutive steps were skipped for non-finite gradients.
    max_skipped_steps: int = 20
    # Micro-batches per update: each is a full step of data.batch_size per rank (the head
    # and embedding losses see that global batch), their gradients averaged, one update.
    accumulate: int = at_least(1, 1)
    # The global batch per update; 0: data.batch_size × ranks × accumulate. When set, each
    # rank's micro-batch is global_batch / (ranks × accumulate), replacing data.batch_size.
    global_batch: int = non_negative(0)
    # Compression of the backbone's data-parallel gradient all-reduce (DDP comm hook).
    comm_hook: Literal["none", "fp16", "bf16"] = "none"
    # Start a new run from trained weights (restore.read_weights): a dpface checkpoint (a
    # step directory, or a run directory: its latest complete step), an arcface_torch
    # backbone.pth, or a plain state dict (keys renamed by init_key_map: {theirs: ours}
    # prefixes). The backbone is loaded; the head is new unless init_head (a dpface
    # checkpoint with the same classes). A resumed run ignores it.
    init_from: str = ""
    init_head: bool = False
    init_key_map: dict = field(default_factory=dict)
    # Fine-tuning: the backbone is frozen (no gradient, BatchNorm in eval mode) for the
    # first steps; afterwards it learns at lr × backbone_lr_scale (the head at lr / head_lr).
    freeze_backbone_steps: int = non_negative(0)
    backbone_lr_scale: float = non_negative(1.0)

    def validate(self) -> None:
        for a, b in (("steps", "epochs"), ("warmup_steps", "warmup_epochs")):
            if getattr(self, a) and getattr(self, b):
                raise Invalid(b, f"and 'train.{a}' are both set ({getattr(self, b)} and {getattr(self, a)}): "
                                 "set exactly one")
        if not self.steps and not self.epochs:
            raise Invalid("steps", "is 0 and train.epochs is not set: set one of them")
        if self.init_head and not self.init_from:
            raise Invalid("init_head", "needs train.init_from (the checkpoint whose head to start from)")
        if any(not isinstance(k, str) or not isinstance(v, str) for k, v in self.init_key_map.items()):
            raise Invalid("init_key_map", f"must map name prefixes to name prefixes (strings), got "
                                          f"{self.init_key_map!r}")
        if self.min_lr > min(self.lr, self.head_lr or self.lr):
            raise Invalid("min_lr", f"({self.min_lr}) must not exceed 'train.lr' ({self.lr}) or "
                                    f"'train.head_lr' ({self.head_lr or self.lr})")

    def length(self, num_images: int | None, global_batch: int) -> tuple[int, int]:
        """(steps, warmup steps) of the run: as set, or derived from epochs over a data set of
        ``num_images`` images at ``global_batch`` images per update."""
        def of(epochs: float, what: str) -> int:
            if not num_images:
                raise ConfigError(f"train.{what} needs the data set's image count, which this data "
                                  "source does not know (a shard pattern without a manifest?): set "
                                  f"train.{what.replace('epochs', 'steps')} instead")
            return math.ceil(epochs * num_images / global_batch)

        steps = self.steps or of(self.epochs, "epochs")
        warmup = self.warmup_steps or (of(self.warmup_epochs, "warmup_epochs") if self.warmup_epochs else 0)
        return steps, warmup

    def optimizer_for(self, params, lr: float | None = None):
        """The configured torch optimizer over ``params`` (the backbone's, a dense head's)."""
        import torch

        lr = self.lr if lr is None else lr
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)

    def head_optimizer_for(self, head):
        """The head's optimizer: lazy row updates for ``update: sampled``, else a dense one."""
        lr = self.head_lr or self.lr
        if head.update == "sampled":
            from dpface.heads.row_optim import make_head_optimizer

            return make_head_optimizer(head, self.optimizer, lr, self.momentum, self.weight_decay)
        return self.optimizer_for(head.parameters(), lr)


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
    # 1: optimizer state sharded; 2: + gradients sharded
    zero_stage: int = rule(1, lambda v: v in (1, 2),
                           "1 or 2 (ZeRO-3 would shard the backbone's weights, which evaluation reads whole)")
    bucket_mb: int = positive(200)  # reduce / all-gather bucket size (MB of fp32 elements)
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

    def validate(self) -> None:
        """Rules that span sections."""
        t = self.train
        if t.accumulate > 1 and self.deepspeed.enabled:
            raise Invalid("train.accumulate", "> 1 is not supported with deepspeed.enabled (DeepSpeed "
                                              "would need its own gradient_accumulation_steps)")
        if t.accumulate > 1 and self.head.update == "sampled":
            raise Invalid("train.accumulate", "> 1 needs head.update: dense (the sampled-row optimizer "
                                              "updates the rows one micro-batch sampled)")
        if t.comm_hook != "none" and self.deepspeed.enabled:
            raise Invalid("train.comm_hook", "applies to the DDP backbone; with deepspeed.enabled set "
                                             "DeepSpeed's own communication options in deepspeed.extra")
        if t.freeze_backbone_steps and self.deepspeed.enabled:
            raise Invalid("train.freeze_backbone_steps", "needs the DDP backbone (deepspeed.enabled: false): "
                                                         "ZeRO's step expects gradients for its parameters")
        if t.global_batch and t.global_batch % t.accumulate:
            raise Invalid("train.global_batch", f"({t.global_batch}) must be a multiple of "
                                                f"train.accumulate ({t.accumulate})")

    def per_rank_batch(self, world_size: int) -> int:
        """data.batch_size, or the share of train.global_batch each rank's micro-batch gets."""
        t = self.train
        if not t.global_batch:
            return self.data.batch_size
        if t.global_batch % (t.accumulate * world_size):
            raise ConfigError(f"train.global_batch {t.global_batch} cannot be split into train.accumulate "
                              f"{t.accumulate} micro-batches on {world_size} rank(s): it must be a multiple "
                              f"of {t.accumulate * world_size}")
        return t.global_batch // (t.accumulate * world_size)


# Component specs are replaced whole by a derived recipe, never merged: parameters
# of the base's component would not fit another component.
SPEC_KEYS = ("model", "head.loss")


# Pairs of train keys of which a config sets one: a layer that sets one clears the other.
EXCLUSIVE = (("steps", "epochs"), ("warmup_steps", "warmup_epochs"))


def _layer(base: dict, over: dict, where: str) -> dict:
    """``over`` (a recipe) merged onto ``base``, EXCLUSIVE pairs resolved (``_clear_other``)."""
    return _merge(_clear_other(base, over, where), over)


def _clear_other(base: dict, over: dict, where: str) -> dict:
    """``base`` with, of each EXCLUSIVE pair, the key ``over`` does not set cleared where
    ``over`` sets the other (both set in one layer: an error)."""
    t = over.get("train") if isinstance(over, dict) else None
    if isinstance(t, dict) and isinstance(base.get("train"), dict):
        base = copy.deepcopy(base)
        for a, b in EXCLUSIVE:
            if t.get(a) and t.get(b):
                raise ConfigError(f"{where}: 'train.{a}' and 'train.{b}' are both set; set exactly one")
            for mine, other in ((a, b), (b, a)):
                if t.get(mine) and other not in t:
                    base["train"][other] = 0
    return base


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
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text (UTF-8) file: byte {e.start} is 0x{e.object[e.start]:02x}; "
                          "is this the config file?") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if data is None:  # an empty file would silently train the defaults (iresnet50 into runs/dpface)
        raise ConfigError(f"{path}: the config file is empty; a recipe names at least its base, model or "
                          "data (see configs/)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a path string")
    return _layer(_read_yaml(path.parent / base, chain + (path,)), data, str(path))


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
AUX_PROVIDED = ("num_classes", "embedding_size", "group", "teacher_module", "teacher_embedding_size", "amp_dtype")


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
                raise ConfigError(f"{source}: '{key}.{name}' expects {type_name(tp)}, "
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
    # Activation checkpointing's options, checked here so a typo is a load-time error.
    spec = cfg.model
    while BACKBONES.is_wrapper(spec["name"]) and isinstance(spec.get("base"), dict):
        spec = spec["base"]
    if "checkpoint" in BACKBONES.parameters(spec["name"]):
        from dpface.models.checkpointing import check_checkpoint

        try:
            check_checkpoint(spec.get("checkpoint", "none"), spec.get("checkpoint_every", 2))
        except ValueError as e:
            raise ConfigError(f"{source}: 'model': {e}") from None
    # Backbones take a fixed input side (a constructor parameter, default 112).
    side = BACKBONES.input_size(cfg.model)
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
    data = _layer(Config().to_dict(), data, str(path))
    source = str(path) if path else "<defaults>"
    data = _clear_other(data, apply_overrides({}, overrides), "the overrides")
    apply_overrides(data, overrides)
    if overrides:
        source += " (with overrides " + " ".join(overrides) + ")"
    return config_from_dict(data, source)


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Validate a plain mapping (e.g. the config stored in a checkpoint)."""
    cfg = build_section(Config, _merge(Config().to_dict(), data), "", source)
    _check_specs(cfg, source)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    from dpface.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = ["Config", "ConfigError", "DataConfig", "DeepSpeedConfig", "EvalConfig", "ExperimentConfig",
           "HeadConfig", "ShardsConfig", "SyntheticDataConfig", "TrainConfig", "WandbConfig",
           "apply_overrides", "config_from_dict", "load_config", "save_config"]
