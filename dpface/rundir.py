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

import fcntl
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

STEP_DIR = re.compile(r"^step-(\d{8})$")
LEFTOVER = re.compile(r"^(step-\d{8})\.(partial|replaced)$")
META = "meta.json"  # a checkpoint directory's commit marker
CHECKPOINTS = "checkpoints"


def step_name(step: int) -> str:
    """``step-00000200``: a complete checkpoint's directory name."""
    return f"step-{step:08d}"


def partial_name(step: int) -> str:
    """A save in progress (renamed to ``step_name`` when complete)."""
    return step_name(step) + ".partial"


def replaced_name(step: int) -> str:
    """The old copy of a step during its re-save."""
    return step_name(step) + ".replaced"


def inside_checkpoints(path) -> Path | None:
    """The checkpoint or checkpoints/ directory ``path`` lies in, if any (nothing but
    dpface's own saves may write there)."""
    for parent in Path(path).resolve().parents:
        if (parent / META).is_file() or parent.name == CHECKPOINTS:
            return parent
    return None


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable."""


def read_meta(step_dir: Path) -> dict:
    try:
        return json.loads((Path(step_dir) / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{step_dir}/meta.json unreadable: {e}") from None


def checkpoint_dir(path, option: str) -> Path:
    """The complete checkpoint directory a user named with ``option`` (--resume,
    --checkpoint): a step directory, or a run directory meaning its latest complete step;
    else a CheckpointError saying what the path is instead."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{option}: no checkpoint directory at {path}")
    run = RunDir(path)
    if run.is_run():
        done = run.complete()
        if not done:
            raise CheckpointError(f"{option}: run directory {path} holds no complete checkpoint "
                                  "(checkpoints/step-N with meta.json)")
        return done[-1]
    if not (path / META).is_file():
        raise CheckpointError(
            f"{option}: {path} is an interrupted save (no meta.json); use a complete step-N"
            if LEFTOVER.match(path.name) else
            f"{option}: {path} is not a checkpoint (no meta.json; expected …/checkpoints/step-N)")
    return path


def _remove_tree(path: Path, why: str) -> None:
    """Delete a directory of ours, never through a symbolic link, never silently failing."""
    if path.is_symlink():
        raise CheckpointError(f"refusing to {why}: {path} is a symbolic link (to {os.readlink(path)}); "
                              "remove the link yourself or choose another experiment.name")
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise CheckpointError(f"could not {why}: {e}") from None


class RunLock:
    """An exclusive lock on one run directory, held by one process of a run (rank 0) for
    its life: flock on ``<run>/.lock``, which the kernel drops when that process dies. The
    file names its holder, so a second run is told who has it."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a clean exit leaves no holder behind
        finally:
            os.close(self._fd)  # releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _holder_alive(text: str) -> bool | None:
    """Whether the process a lock file names still runs (None: another host, or unknown)."""
    m = re.match(r"pid (\d+) on (\S+)", text)
    if not m or m.group(2) != socket.gethostname():
        return None
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class RunDir:
    root: Path

    # Files a fresh start with --overwrite removes (with checkpoints/ and plots/).
    RUN_FILES = ("metrics.jsonl", "final_metrics.json", "wandb_run_id")
    CARD_MD, CARD_JSON = "MODEL_CARD.md", "model_card.json"

    @classmethod
    def of(cls, output_dir, name: str) -> RunDir:
        return cls(Path(output_dir) / name)

    @classmethod
    def of_checkpoint(cls, step_dir) -> RunDir:
        """The run a checkpoint directory belongs to (…/<run>/checkpoints/step-N)."""
        step_dir = Path(step_dir)
        return cls(step_dir.parent.parent if step_dir.parent.name == CHECKPOINTS else step_dir.parent)

    @staticmethod
    def in_run(step_dir) -> bool:
        """Whether a checkpoint directory sits in a run's ``checkpoints/``."""
        return Path(step_dir).parent.name == CHECKPOINTS

    def is_run(self) -> bool:
        """A run directory (holds checkpoints/), as opposed to a checkpoint directory."""
        return self.root.is_dir() and not (self.root / META).exists() and self.checkpoints.is_dir()

    # -- the layout ------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def card_md(self) -> Path:
        return self.root / self.CARD_MD

    @property
    def card_json(self) -> Path:
        return self.root / self.CARD_JSON

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
        return self.checkpoints / step_name(step)

    # -- checkpoints -------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir()
                 if p.is_dir() and STEP_DIR.match(p.name) and (p / META).is_file()]
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

    def lock(self) -> RunLock:
        """The run directory for this process alone (a second ``dpface train`` on the same
        experiment.name would interleave checkpoints, metrics and model cards)."""
        for part in (self.root, self.checkpoints):
            if part.is_symlink():
                raise CheckpointError(f"{part} is a symbolic link (to {os.readlink(part)}): dpface writes and "
                                      "deletes checkpoints there; use a real directory (experiment.output_dir "
                                      "may point anywhere)")
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(f"{self.root} is in use by another dpface run ({holder}); wait for it to "
                                  "finish, or choose another experiment.name") from None
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous and _holder_alive(previous) is False:
            print(f"dpface: {path}: the run that held it ({previous}) ended without releasing it; taken over",
                  flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        return RunLock(path, fd)

    def remove_if_unused(self) -> None:
        """Remove the run directory if it holds nothing but its (released) lock file: what a
        start that failed before writing anything leaves behind."""
        try:
            if {p.name for p in self.root.iterdir()} <= {".lock"}:
                (self.root / ".lock").unlink(missing_ok=True)
                self.root.rmdir()
        except OSError:
            pass  # another process is using it: leave it

    def set_aside_newer(self, step: int) -> Path | None:
        """Resuming from ``step`` while later complete checkpoints exist: they move, intact,
        to ``checkpoints/abandoned-after-step-N-<time>/`` (rotation would otherwise delete
        the new branch's checkpoints as they are written, and --resume auto would return
        to the old branch). Returns where they went."""
        newer = [p for p in self.complete() if int(STEP_DIR.match(p.name).group(1)) > step]
        if not newer:
            return None
        dest = self.checkpoints / f"abandoned-after-step-{step:08d}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.mkdir()
        for p in newer:
            os.replace(p, dest / p.name)
        return dest

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
            if m.group(2) == "replaced" and not final.exists() and (p / META).is_file():
                os.replace(p, final)
            else:
                _remove_tree(p, "remove an interrupted save")

    def clear(self) -> None:
        """Delete a previous run's checkpoints, plots and logs (``--overwrite``); refuses
        symbolic links rather than deleting through them, and any failure is an error."""
        for d in (self.checkpoints, self.plots):
            _remove_tree(d, "delete the previous run's files (--overwrite)")
        for f in self.RUN_FILES:
            path = self.root / f
            if path.is_symlink():
                raise CheckpointError(f"refusing to delete {path}: a symbolic link")
            path.unlink(missing_ok=True)
