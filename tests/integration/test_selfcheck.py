"""The device self-check (dpface.ops.selfcheck), `dpface kernels --check`, the trainer's
reaction to a compiled op that is wrong on its device, and kernel=auto's timing of the
fused op against the chunked path."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from dpface import ops
from dpface.cli import main
from dpface.heads import PartialFC
from dpface.losses import build_loss
from dpface.ops import selfcheck
from tests.helpers import load_tiny, tiny_overrides

pytestmark = pytest.mark.skipif(not ops.available("cpu"), reason="dpface._kernels not built")


@pytest.fixture
def broken_ops(monkeypatch):
    """Both margin-softmax implementations return a log-sum-exp off by 0.5 (~1 % of it) —
    but only where the self-check calls them, as a kernel wrong on one device kind would be."""
    real = selfcheck._impl_fn

    def impl_fn(impl):
        fn = real(impl)

        def wrong(*args):
            out = fn(*args)
            return (out[0] + 0.5, *out[1:])

        return wrong

    monkeypatch.setattr(selfcheck, "_impl_fn", impl_fn)


def test_every_op_passes_on_this_cpu():
    checks = selfcheck.check_all(["cpu"])
    names = [c.op for c in checks]
    assert names == ["margin_softmax fused (cpu, fp32)", "margin_softmax fused (cpu, bf16)",
                     "margin_softmax chunked (cpu, fp32)", "margin_softmax chunked (cpu, bf16)",
                     "range_loss (cpu, fp32)", "sgd_rows (cpu, fp32)"]
    assert all(c.ok for c in checks), [c.line() for c in checks]


def test_a_wrong_op_is_a_mismatch(broken_ops):
    c = selfcheck.check_margin_softmax("fused", "cpu")
    assert not c.ok and c.worst == "lse" and 0.4 / 64 < c.error < 0.6 / 16
    assert "MISMATCH" in c.line()


def test_kernels_check_prints_a_line_per_op_and_fails_on_a_mismatch(capsys, monkeypatch, broken_ops):
    assert main(["kernels", "--check"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("dpface kernels: CPU built")
    assert sum("MISMATCH" in line for line in out) == 4  # both impls, both precisions
    assert any(line.strip().startswith("range_loss (cpu, fp32): ok") for line in out)
    monkeypatch.undo()
    assert main(["kernels", "--check"]) == 0
    assert "MISMATCH" not in capsys.readouterr().out


def test_trainer_with_auto_falls_back_to_the_reference_loudly(tmp_path, broken_ops, capsys):
    from dpface.engine.trainer import Trainer

    cfg = load_tiny(tmp_path, "auto", "train.steps=1", "head.loss={name: arcface, s: 16.0, m: 0.3}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(cfg)
    assert any("failed its self-check" in str(w.message) for w in caught)
    assert trainer.head.kernel_choice("cpu")[0] is None
    assert trainer.head_kernel.startswith("PyTorch reference (the compiled op failed its self-check")
    trainer.fit()
    assert "head: PyTorch reference (the compiled op failed its self-check" in capsys.readouterr().out


DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "cpu_demo.yaml")


@pytest.mark.parametrize("kernel", ["fused", "chunked"])
def test_trainer_with_the_kernel_named_stops_with_one_error_line(tmp_path, broken_ops, capsys, kernel):
    rc = main(["train", "--config", DEMO, *tiny_overrides(f"head.kernel={kernel}", "train.steps=1",
                                                          out=tmp_path, name="x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"dpface: error: head.kernel={kernel}: the compiled op failed its self-check")
    assert "use head.kernel=reference" in err[0]
    assert not (tmp_path / "x" / "checkpoints").exists() or not any((tmp_path / "x" / "checkpoints").iterdir())


def test_sphereface_with_kernel_fused_is_one_error_line(tmp_path, capsys):
    rc = main(["train", "--config", DEMO, *tiny_overrides("head.kernel=fused", "head.loss={name: sphereface, m: 4}",
                                                          "train.steps=1", out=tmp_path, name="s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["dpface: error: head.kernel=fused needs the fused op, but SphereFace is not "
                               "expressible by the fused op"], err


def test_autotune_keeps_the_faster_implementation(monkeypatch):
    """kernel=auto times fused and chunked on the run's shapes (the trainer does it on CUDA;
    here on the CPU) and keeps the faster; the start-up line shows both times."""
    head = PartialFC(32, 5000, build_loss({"name": "arcface", "s": 64, "m": 0.5}), sample_rate=0.2)
    ms = head.autotune(64, torch.device("cpu"), iters=2)
    assert set(ms) == {"fused", "chunked"} and all(v > 0 for v in ms.values())
    impl, why = head.kernel_choice("cpu")
    assert impl == min(ms, key=ms.get)
    assert f"auto: fused {ms['fused']:.1f} ms vs chunked {ms['chunked']:.1f} ms per step" in why

    import time

    real = ops.margin_softmax

    def slow_fused(*a, impl="fused", **kw):  # make the fused op the slow one
        if impl == "fused":
            time.sleep(0.05)
        return real(*a, impl=impl, **kw)

    monkeypatch.setattr(ops, "margin_softmax", slow_fused)
    head.autotune(64, torch.device("cpu"), iters=2)
    assert head.kernel_choice("cpu")[0] == "chunked"
    for kernel in ("fused", "chunked", "reference"):  # only auto is tuned
        assert PartialFC(32, 5000, build_loss({"name": "arcface"}), kernel=kernel).autotune(64, torch.device("cpu")) \
            is None
