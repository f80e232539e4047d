"""What of the compiled extension (``dpface._kernels``, built from kernels/) this install has.

Loading it registers the ``torch.ops.dpface`` ops (CPU always, CUDA where it was built with
CUDA). A missing extension is not an error: every op has the PyTorch reference it is tested
against, and callers fall back to it with one warning (:func:`warn_missing`).
"""
from __future__ import annotations

import warnings

import torch  # first: the extension links against libc10/libtorch, which torch loads

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
    """One line: what is built (CPU / CUDA / missing), for which ISA / archs, and the device."""
    if _EXT is None:
        return (f"dpface kernels: missing (dpface._kernels not importable: {_EXT_ERROR}); every op "
                "uses the PyTorch reference. Rebuild: pip install --no-build-isolation -e .")
    bf16 = "bf16 GEMMs" if getattr(_EXT, "CPU_BF16", 0) else "bf16 rounding on fp32 GEMMs"
    cpu = f"CPU built ({getattr(_EXT, 'CPU_ISA', '?')}; ATen: {torch.backends.cpu.get_cpu_capability()}; {bf16})"
    if not _EXT.WITH_CUDA:
        why = "torch has no CUDA" if not torch.version.cuda else "no nvcc at install time"
        return f"dpface kernels: {cpu}; CUDA not built: {why}"
    archs = getattr(_EXT, "CUDA_ARCHS", "?").replace("+", ", ")
    if not torch.cuda.is_available():
        return f"dpface kernels: {cpu}; CUDA built for {archs} (no CUDA device visible)"
    major, minor = torch.cuda.get_device_capability()
    device = f"{torch.cuda.get_device_name()}, compute capability {major}.{minor}"
    sm = f"sm_{major}{minor}"
    runs = any(a.startswith(sm) or a.startswith(f"compute_{major}") for a in archs.split(", "))
    note = "" if runs else f"; NOT built for {sm}: the kernels cannot run here"
    return f"dpface kernels: {cpu}; CUDA built for {archs} (device: {device}){note}"


def warn_missing(what: str) -> None:
    """The one warning for a missing extension (Python shows it once per call site)."""
    warnings.warn(f"{what}: the compiled dpface kernels are not available for this device, "
                  f"using the PyTorch reference (same results, slower). {report()}",
                  RuntimeWarning, stacklevel=3)


__all__ = ["available", "report", "warn_missing"]
