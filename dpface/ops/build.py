"""What of the compiled extension (``dpface._kernels``, built from kernels/) this install has.

Loading it registers the ``torch.ops.dpface`` ops (CPU always, CUDA where it was built with
CUDA). A missing extension is not an error: every op has the PyTorch reference it is tested
against, and callers fall back to it with one warning (:func:`warn_missing`).
"""
from __future__ import annotations

import functools
import warnings


@functools.lru_cache(maxsize=None)
def _load():
    """(module or None, import error text or None); cached: the import happens once."""
    try:
        from dpface import _kernels
    except ImportError as e:  # not built (no compiler at install time) or a broken build
        return None, str(e)
    return _kernels, None


def available(device_type: str = "cpu") -> bool:
    """Whether the fused ops run on tensors of this device type ("cpu", "cuda")."""
    mod, _ = _load()
    if mod is None:
        return False
    if device_type == "cpu":
        return True
    return device_type == "cuda" and bool(getattr(mod, "WITH_CUDA", 0))


def report() -> str:
    """One line: what is built (CPU / CUDA / missing)."""
    mod, err = _load()
    if mod is None:
        return (f"dpface kernels: missing (dpface._kernels not importable: {err}); every op "
                "uses the PyTorch reference. Rebuild: pip install --no-build-isolation -e .")
    parts = ["CPU"] + (["CUDA"] if getattr(mod, "WITH_CUDA", 0) else [])
    import torch

    cuda_note = "" if "CUDA" in parts else (
        " (CUDA not built: torch has no CUDA)" if not torch.version.cuda
        else " (CUDA not built: no nvcc at install time)")
    return f"dpface kernels: {' + '.join(parts)} built{cuda_note}"


def warn_missing(what: str) -> None:
    """The one warning for a missing extension (Python shows it once per call site)."""
    warnings.warn(f"{what}: the compiled dpface kernels are not available for this device, "
                  f"using the PyTorch reference (same results, slower). {report()}",
                  RuntimeWarning, stacklevel=3)


__all__ = ["available", "report", "warn_missing"]
