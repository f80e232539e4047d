"""What every command shares about failing: the exit codes, the error types a command
raises for bad arguments, and the one-line message an expected failure becomes."""
from __future__ import annotations

import errno
import json
import math
import re
import sys

# Exit codes (README "Errors"): 0 ok; 1 an unexpected failure (a bug: traceback);
# 2 bad input (config, override, spec, checkpoint, command arguments, missing file);
# 3 bad data (shards, labels, too many unusable samples, a data position that cannot
# continue); 4 training diverged
# (non-finite gradients); 5 no space left on device.
EXIT_INPUT, EXIT_DATA, EXIT_DIVERGED, EXIT_NO_SPACE = 2, 3, 4, 5


class InputError(Exception):
    """A command's arguments are wrong (plan, convert, --bin): exit 2, no traceback."""


def error_message(e: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) for an expected failure; None for anything else,
    which keeps its traceback."""
    from dpface.data.align import AlignUnavailable
    from dpface.data.formats.shards import ShardError
    from dpface.eval.ijb import ProtocolError
    from dpface.heads.sharding import HeadShardError
    from dpface.registry import SpecError
    from dpface.rundir import CheckpointError
    from dpface.schema import ConfigError

    chain, c = [], e
    while c is not None and len(chain) < 10:  # torch wraps a failed write in its own error
        chain.append(c)
        c = c.__cause__ or c.__context__
    for c in chain:
        if isinstance(c, OSError) and c.errno == errno.ENOSPC:
            where = next((x.filename for x in chain if isinstance(x, OSError) and x.filename), None)
            return f"no space left on device{f' writing {where}' if where else ''}", EXIT_NO_SPACE
    # A path the user chose cannot be written (a read-only output directory, a file where
    # a directory should be): the path and the reason, not a traceback.
    if isinstance(e, (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)) and e.filename:
        return f"cannot write {e.filename}: {e.strerror}", EXIT_INPUT
    text = str(e)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep its last line
        last = [l for l in text.splitlines() if l.strip()][-1]
        # "module.LabelError: sample …" → "sample …"
        text = re.sub(r"^[A-Za-z_][\w.]*(Error|Exception): ", "", last)
    if isinstance(e, ShardError):
        return text, EXIT_DATA
    if isinstance(e, FloatingPointError):
        return text, EXIT_DIVERGED
    if isinstance(e, (ConfigError, CheckpointError, HeadShardError, SpecError, InputError,
                      FileNotFoundError, ProtocolError, AlignUnavailable)):
        return text, EXIT_INPUT
    return None


def json_metrics(metrics: dict) -> str:
    """JSON without bare NaN/Infinity (not JSON; strict parsers reject them): null instead."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v
             for k, v in metrics.items()}
    return json.dumps(clean, indent=1, allow_nan=False)


def err(msg: str) -> None:
    """A progress or notice line on stderr (stdout carries a command's results)."""
    print(msg, file=sys.stderr, flush=True)
