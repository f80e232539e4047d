"""The run directory: the one place that knows where a run's files live.

    <experiment.output_dir>/<experiment.name>/
        config.yaml  metrics.jsonl  final_metrics.json  wandb_run_id  MODEL_CARD.md  plots/
        checkpoints/step-00000200/      complete: holds meta.json (the commit marker)
        checkpoints/step-00000300.partial/    a save in progress (or interrupted)
        checkpoints/step-00000100.replaced/   the old copy during a re-save of step 100

The trainer, the CLI (eval, export, cluster) and the Ray entry all go through
:class:`RunDir`, so the layout and the resume rules are written once.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

STEP_DIR = re.compile(r"^step-(\d{8})$")
LEFTOVER = re.compile(r"^(step-\d{8})\.(partial|replaced)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable."""


def read_meta(step_dir: Path) -> dict:
    try:
        return json.loads((Path(step_dir) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{step_dir}/meta.json unreadable: {e}") from None


def checkpoint_dir(path, option: str) -> Path:
    """The complete checkpoint directory a user named with ``option`` (--resume,
    --checkpoint), or a CheckpointError saying what the path is instead."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{option}: no checkpoint directory at {path}")
    if not (path / "meta.json").is_file():
        raise CheckpointError(
            f"{option}: {path} is an interrupted save (no meta.json); use a complete step-N"
            if LEFTOVER.match(path.name) else
            f"{option}: {path} is not a checkpoint (no meta.json; expected …/checkpoints/step-N)")
    return path


@dataclass(frozen=True)
class RunDir:
    root: Path

    # Files a fresh start with --overwrite removes (with checkpoints/ and plots/).
    RUN_FILES = ("metrics.jsonl", "final_metrics.json", "wandb_run_id")

    @classmethod
    def of(cls, output_dir, name: str) -> RunDir:
        return cls(Path(output_dir) / name)

    @classmethod
    def of_checkpoint(cls, step_dir) -> RunDir:
        """The run a checkpoint directory belongs to (…/<run>/checkpoints/step-N)."""
        step_dir = Path(step_dir)
        return cls(step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent)

    # -- the layout ------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def final_metrics_file(self) -> Path:
        return self.root / "final_metrics.json"

    @property
    def wandb_id_file(self) -> Path:
        return self.root / "wandb_run_id"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}"

    # -- checkpoints -------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir()
                 if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def resolve_resume(self, resume: str | None) -> Path | None:
        """'auto' → the latest complete checkpoint (or None to start fresh); a path →
        that checkpoint directory, which must be complete."""
        if not resume:
            return None
        if resume == "auto":
            done = self.complete()
            return done[-1] if done else None
        return checkpoint_dir(resume, "--resume")

    def recover_interrupted(self) -> None:
        """Rank 0 at start-up, while no rank saves: remove the ``.partial`` directories of
        interrupted saves, and finish a re-save killed between its two renames (its old
        directory, ``step-N.replaced``, goes back in place if ``step-N`` is missing)."""
        if not self.checkpoints.is_dir():
            return
        for p in self.checkpoints.iterdir():
            m = LEFTOVER.match(p.name)
            if not m:
                continue
            final = self.checkpoints / m.group(1)
            if m.group(2) == "replaced" and not final.exists() and (p / "meta.json").is_file():
                os.replace(p, final)
            else:
                shutil.rmtree(p, ignore_errors=True)

    def clear(self) -> None:
        """Delete a previous run's checkpoints, plots and logs (``--overwrite``)."""
        for d in (self.checkpoints, self.plots):
            shutil.rmtree(d, ignore_errors=True)
        for f in self.RUN_FILES:
            (self.root / f).unlink(missing_ok=True)
