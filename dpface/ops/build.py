"""What of the compiled extension (``dpface._kernels``, built from kernels/) this install has.

Loading it registers the ``torch.ops.dpface`` ops (CPU always, CUDA where it was built with
CUDA). A missing extension is not an error: every op has the PyTorch reference it is tested
against, and callers fall back to it with one warning (:func:`warn_missing`).
"""
from __future__ import annotations

import warnings

# Imported once, when dpface.ops is first imported: (module or None, why it is missing).
try:
    from dpface import _kernels as _EXT
    _EXT_ERROR = None
except ImportError as _e:  # not built (no compiler at install time) or a broken build
    _EXT, _EXT_ERROR = None, str(_e)


def available(device_type: str = "cpu") -> bool:
    """Whether the fused ops run on tensors of this device type ("cpu", "cuda")."""
    if _EXT is None:
        return False
    return device_type == "cpu" or (device_type == "cuda" and bool(_EXT.WITH_CUDA))


def report() -> str:
    """One line: what is built (CPU / CUDA / missing)."""
    if _EXT is None:
        return (f"dpface kernels: missing (dpface._kernels not importable: {_EXT_ERROR}); every op "
                "uses the PyTorch reference. Rebuild: pip install --no-build-isolation -e .")
    parts = ["CPU"] + (["CUDA"] if _EXT.WITH_CUDA else [])
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
