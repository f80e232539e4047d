"""Issue 10 items 11-16 and the small ones: every bad input stops with one
`dpface: error:` line naming the key (and file), with a documented exit code."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

from dpface.cli import main
from dpface.config import ConfigError, load_config

DEMO = "configs/cpu_demo.yaml"


def run_cli(*argv, env=None):
    """The CLI as a user runs it: a subprocess, so stderr and the exit code are real."""
    import os
    return subprocess.run([sys.executable, "-m", "dpface", *argv], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("dpface: error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- 11: loss parameters are type- and range-checked at load ---------------------------
@pytest.mark.parametrize("override, words", [
    ("head.loss.s=abc", ["'head.loss.s'", "float", "'abc'"]),
    ("head.loss.s=-1", ["'head.loss'", "s must be > 0"]),
    ("head.loss.m=4", ["'head.loss'", "m2 must be in [0, pi)"]),
])
def test_loss_parameters_checked_at_load(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override])
    msg = str(e.value)
    assert DEMO in msg and all(w in msg for w in words), msg


def test_nested_and_model_spec_types_checked():
    with pytest.raises(ConfigError, match="'head.loss.base.s' expects float"):
        load_config(None, ["head.loss={name: km, base: {name: arcface, s: x}}"])
    with pytest.raises(ConfigError, match="'model.dropout' expects float"):
        load_config(None, ["model={name: iresnet18, dropout: lots}"])


# -- 12: YAML 1.1 exponent floats --------------------------------------------------------
def test_exponent_floats_accepted(tmp_path):
    cfg = load_config(DEMO, ["train.lr=1e-3", "train.weight_decay=5e-4", "head.loss.s=3e1"])
    assert cfg.train.lr == 1e-3 and cfg.train.weight_decay == 5e-4
    assert cfg.head.loss["s"] == 30.0 and isinstance(cfg.head.loss["s"], float)
    p = tmp_path / "r.yaml"
    p.write_text("train: {lr: 1e-3, min_lr: 1e-6, weight_decay: 1e-4}\n"
                 "head: {loss: {name: arcface, s: 6.4e1, m: 5e-1}}\n")
    cfg = load_config(p)
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.weight_decay) == (1e-3, 1e-6, 1e-4)
    assert cfg.head.loss == {"name": "arcface", "s": 64.0, "m": 0.5}
    with pytest.raises(ConfigError, match="'train.steps' expects int"):
        load_config(None, ["train.steps=1e3"])  # an exponent is a float, not a step count


# -- 13: no CUDA device ----------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_gpu_is_a_clear_error():
    from dpface import distributed as dist
    with pytest.raises(ConfigError, match="no CUDA device"):
        dist.init_from_env("cuda")


# -- 14: accepted but wrong later ------------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    (["data.image_size=64"], "'data.image_size' is 64 but backbone 'iresnet_tiny' takes 112"),
    (["eval.fars=[2.0]"], "'eval.fars' must be a list of numbers in \\(0, 1\\]"),
    (["eval.batch_size=0"], "'eval.batch_size' must be > 0"),
    (["train.poly_power=-1"], "'train.poly_power' must be >= 0"),
    (["train.min_lr=0.5"], "'train.min_lr' \\(0.5\\) must not exceed 'train.lr' \\(0.1\\)"),
])
def test_values_wrong_later_are_refused_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DEMO, overrides)


def test_unset_shards_is_refused_before_training():
    from dpface import distributed as dist
    with pytest.raises(ConfigError, match="'data.shards.manifest' must name"):
        load_config(DEMO, ["data.backend=webdataset"]).data.build(dist.init_from_env("cpu"), seed=0)


def test_image_size_with_matching_backbone_input_is_fine():
    cfg = load_config(DEMO, ["data.image_size=64", "model={name: iresnet_tiny, input_size: 64}"])
    assert cfg.data.image_size == 64


# -- 15: overrides on both sides of --resume ------------------------------------------------
def test_overrides_on_both_sides_of_resume(monkeypatch):
    from dpface.commands import train as train_command
    seen = {}
    monkeypatch.setattr(train_command, "run", lambda a: seen.update(vars(a)) or 0)
    assert main(["train", "--config", DEMO, "train.lr=0.05", "--resume", "auto",
                     "train.steps=3"]) == 0
    assert seen["overrides"] == ["train.lr=0.05", "train.steps=3"] and seen["resume"] == "auto"


# -- 16: one error style -------------------------------------------------------------------
def test_errors_are_one_line_and_debug_shows_traceback(tmp_path):
    r = run_cli("train", "--config", DEMO, "head.loss.s=abc")
    assert r.returncode == 2 and "head.loss.s" in one_error_line(r.stderr)
    r = run_cli("--debug", "train", "--config", DEMO, "head.loss.s=abc")
    assert r.returncode == 2 and "Traceback" in r.stderr
    r = run_cli("train", "--config", DEMO, "head.loss.s=abc", env={"DPFACE_DEBUG": "1"})
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_eval_of_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "somedir").mkdir()
    assert main(["eval", "--checkpoint", str(tmp_path / "somedir")]) == 2
    err = capsys.readouterr().err
    assert "--resume" not in err and "interrupted" not in err
    assert "not a checkpoint" in err and "somedir" in err
    (tmp_path / "step-00000010.partial").mkdir()
    assert main(["eval", "--checkpoint", str(tmp_path / "step-00000010.partial")]) == 2
    assert "interrupted" in capsys.readouterr().err  # a real partial save says so


def test_plan_bin_and_convert_errors_are_one_line(tmp_path):
    r = run_cli("plan", "--classes", "0", "--world", "2", "--batch", "8")
    assert r.returncode == 2 and "classes" in one_error_line(r.stderr)
    out = tmp_path / "wds"
    r = run_cli("convert", "synthetic", "--identities", "3", "--max-images", "2", str(out),
                "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\x1b" not in r.stderr  # clean lines when not a terminal
    r = run_cli("convert", "synthetic", "--identities", "4", "--max-images", "2", str(out),
                "--workers", "0")
    line = one_error_line(r.stderr)
    assert r.returncode == 2 and "--overwrite" in line and "overwrite=True" not in line
    r = run_cli("convert", "folder", str(tmp_path / "nope"), str(tmp_path / "o2"))
    assert r.returncode == 2 and "nope" in one_error_line(r.stderr)


def test_disk_full_save_names_the_file(tmp_path, monkeypatch, capsys):
    import errno

    from dpface.commands.errors import error_message as _error_message
    e = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "trainer.pt"))
    msg, code = _error_message(e)
    assert "no space left on device" in msg and "trainer.pt" in msg and code == 5
    wrapped = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 0")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")
    msg, code = _error_message(wrapped)
    assert "no space left on device" in msg and code == 5


# -- small -----------------------------------------------------------------------------------
def test_version_and_print_config(tmp_path):
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("dpface ")
    r = run_cli("train", "--config", DEMO, "train.lr=0.05", "--print-config")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["train"]["lr"] == 0.05 and cfg["model"] == {"name": "iresnet_tiny"}
    assert not (tmp_path / "runs").exists()


def test_fp16_on_cpu_warns():
    from dpface.engine.amp import resolve_amp
    with pytest.warns(UserWarning, match="fp16 on the CPU"):
        resolve_amp("fp16", torch.device("cpu"))


def test_eval_json_has_no_bare_nan():
    from dpface.commands.errors import json_metrics as _json_metrics
    text = _json_metrics({"a/acc": 0.5, "a/tar@far=0.001": float("nan")})
    assert "NaN" not in text and json.loads(text)["a/tar@far=0.001"] is None


@pytest.mark.parametrize("name", ["..", "/tmp/elsewhere", "", "a/b", "~x"])
def test_experiment_name_stays_inside_output_dir(tmp_path, capsys, name):
    """A name with '..', an absolute path or nothing would write outside experiment.output_dir
    or into its root: refused before anything is written (exit 2)."""
    assert main(["train", "--config", DEMO, f"experiment.output_dir={tmp_path}", f"experiment.name={name}",
                     "--print-config"]) == 2
    assert "'experiment.name' must be a single directory name" in one_error_line(capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


def test_empty_and_binary_config_files_are_refused(tmp_path, capsys):
    empty, binary = tmp_path / "empty.yaml", tmp_path / "model.pt"
    empty.write_text("# nothing here\n")
    binary.write_bytes(bytes(range(128, 256)))
    assert main(["train", "--config", str(empty), f"experiment.output_dir={tmp_path}"]) == 2
    assert "the config file is empty" in one_error_line(capsys.readouterr().err)
    assert main(["train", "--config", str(binary), f"experiment.output_dir={tmp_path}"]) == 2
    assert "not a text (UTF-8) file" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "dpface").exists()


def test_manifest_without_shards_or_with_lying_counts_is_refused_at_start(tmp_path):
    """Counts drive epochs, progress and resume positions: checked against each shard's
    index header before any reading (a lying manifest showed epoch 0.0016 and trained on)."""
    from dpface.data.formats.convert import convert_synthetic
    from dpface.data.formats.shards import ShardError, resolve_shards

    out = tmp_path / "s"
    convert_synthetic(str(out), num_identities=6, max_images=4, min_images=2, seed=0, max_shard_samples=8)
    good = json.loads((out / "manifest.json").read_text())
    assert resolve_shards(str(out / "manifest.json")).tars
    cases = {"empty": (dict(good, shards=[]), "lists no shards"),
             "shard": (dict(good, shards=[dict(good["shards"][0], samples=800), *good["shards"][1:]]),
                       "holds 800 samples, its index lists 8"),
             "total": (dict(good, num_images=good["num_images"] * 100), "num_images is")}
    for name, (manifest, message) in cases.items():
        path = out / f"{name}.json"
        path.write_text(json.dumps(manifest))
        with pytest.raises(ShardError, match=message):
            resolve_shards(str(path))


def test_deepspeed_without_a_launcher_is_one_error_line(tmp_path, capsys):
    pytest.importorskip("deepspeed")
    from tests.helpers import tiny_overrides

    assert main(["train", "--config", DEMO, *tiny_overrides("deepspeed.enabled=true", out=tmp_path, name="d")]) == 2
    assert "needs a distributed launch" in one_error_line(capsys.readouterr().err)


def test_synthetic_ijb_without_scikit_image_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage → ImportError
    assert main(["convert", "synthetic-ijb", str(tmp_path / "ijb")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "need scikit-image" in line and "dpface[eval]" in line


def test_an_output_directory_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    """A file where the output directory should be, and a read-only directory (simulated:
    the tests may run as root, who writes anywhere): the path and the reason, exit 2."""
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--config", DEMO, f"experiment.output_dir={tmp_path / 'afile' / 'runs'}"]) == 2
    assert "cannot write " in one_error_line(capsys.readouterr().err)
    import pathlib

    def read_only(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    assert main(["train", "--config", DEMO, f"experiment.output_dir={tmp_path / 'ro'}"]) == 2
    assert one_error_line(capsys.readouterr().err).endswith("Permission denied")
