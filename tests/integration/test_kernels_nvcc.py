"""The CUDA kernels compile with nvcc (no GPU and no CUDA torch needed).

Every ``kernels/csrc/cuda/*.cu`` builds for sm_80 and sm_90 without errors or warnings in
our own sources, with no register spills and static shared memory within the limit; a
host program that includes the C interface links against the objects, which proves every
declared entry point is defined with C linkage. Here nothing runs: tests/integration/test_kernels_emu.py
executes the same sources on the CPU.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "kernels" / "csrc"
CUDA_DIR = CSRC / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")
TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA kernels cannot be compiled here")

# The C entry points of dpface_cuda.h; the link test takes the address of each.
C_FUNCTIONS = [
    "dpface_cuda_error_string",
    "dpface_margin_softmax_fwd_workspace",
    "dpface_margin_softmax_fwd_f32",
    "dpface_margin_softmax_fwd_bf16",
    "dpface_margin_softmax_bwd_workspace",
    "dpface_margin_softmax_bwd_f32",
    "dpface_margin_softmax_bwd_bf16",
    "dpface_range_loss_workspace",
    "dpface_range_loss_fwd_f32",
    "dpface_range_loss_fwd_f64",
    "dpface_range_loss_bwd_f32",
    "dpface_range_loss_bwd_f64",
    "dpface_chunk_fwd_epilogue",
    "dpface_chunk_bwd_epilogue",
]


# The architectures the resource check covers: A100 and H100/H200.
ARCHS = ("sm_80", "sm_90")
GENCODE = [f for a in ARCHS for f in ("-gencode", f"arch=compute_{a[3:]},code={a}")]
STATIC_SMEM_LIMIT = 48 * 1024  # bytes of static __shared__ per block without an opt-in


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"nvcc timed out after {TIMEOUT_S}s: {' '.join(cmd)}\n{e.stderr or ''}")


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """Compiles each .cu at most once per module: {path: (CompletedProcess, object path)}."""
    out_dir = tmp_path_factory.mktemp("dpface_nvcc")
    cache: dict[Path, tuple[subprocess.CompletedProcess, Path]] = {}

    def compile_one(cu: Path):
        if cu not in cache:
            obj = out_dir / (cu.stem + ".o")
            cmd = [NVCC, "-std=c++17", "-O3", "--resource-usage", *GENCODE, "-c", "-o", str(obj), str(cu),
                   "-I", str(CSRC)]
            cache[cu] = (_run(cmd, ROOT), obj)
        return cache[cu]

    return compile_one


def test_there_are_kernels():
    assert CU_FILES, f"no .cu files under {CUDA_DIR}"
    assert (CUDA_DIR / "dpface_cuda.h").is_file()


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles(cu, objects):
    proc, obj = objects(cu)
    assert proc.returncode == 0, f"nvcc failed on {cu.name}:\n{proc.stderr}"
    assert obj.is_file()
    ours = [line for line in proc.stderr.splitlines()
            if "warning" in line.lower() and (str(CSRC) in line or cu.name in line)]
    assert not ours, f"nvcc warnings in {cu.name}:\n{proc.stderr}"


def resource_usage(stderr: str) -> list[dict]:
    """ptxas' --resource-usage report: one dict per (kernel, arch)."""
    out, cur = [], None
    for line in stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2)}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["spill"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            m = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(m.group(1)) if m else 0
    return out


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_no_spills_and_shared_memory_within_the_limit(cu, objects):
    """Every kernel, for sm_80 and sm_90: no register spills, static shared memory within
    48 KiB, and at most 255 registers (blocks are <= 256 threads: 64 Ki registers/SM)."""
    proc, _ = objects(cu)
    assert proc.returncode == 0, proc.stderr
    usage = resource_usage(proc.stderr)
    assert {u["arch"] for u in usage} == set(ARCHS), proc.stderr[-2000:]
    for u in usage:
        assert u.get("spill") == 0, f"{u['kernel']} ({u['arch']}) spills: {u}"
        assert u.get("smem", 0) <= STATIC_SMEM_LIMIT, f"{u['kernel']} ({u['arch']}): {u}"
        assert 0 < u.get("registers", 0) <= 255, u


HOST_MAIN = r"""
#include "cuda/dpface_cuda.h"
#include <cstdio>

// Address of every entry point: the link fails if any is missing or C++-mangled.
static void* const kEntryPoints[] = {
%s
};

int main() {
  size_t bytes = 0;
  int rc = dpface_margin_softmax_fwd_workspace(64, 1000, 512, &bytes);
  std::printf("%%d %%zu %%s %%zu\n", rc, bytes, dpface_cuda_error_string(rc),
              sizeof(kEntryPoints) / sizeof(kEntryPoints[0]));
  return 0;
}
"""


def test_c_interface_links(objects, tmp_path):
    objs = []
    for cu in CU_FILES:
        proc, obj = objects(cu)
        if proc.returncode != 0:
            pytest.fail(f"{cu.name} does not compile (see test_cu_compiles):\n{proc.stderr}")
        objs.append(str(obj))
    main = tmp_path / "main.cu"
    main.write_text(HOST_MAIN % "\n".join(f"    reinterpret_cast<void*>(&{f})," for f in C_FUNCTIONS))
    prog = tmp_path / "prog"
    cmd = [NVCC, "-std=c++17", "-arch=sm_90", "-I", str(CSRC), str(main), *objs, "-o", str(prog)]
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0, f"linking the C interface failed:\n{proc.stderr}"
    assert prog.is_file()


# ---- the torch glue: cuda_ops.cpp and binding.cpp as a CUDA build compiles them ----------

def test_cuda_glue_compiles_against_torch_headers(tmp_path):
    """cuda_ops.cpp (allocation, checks, streams) is built only where torch has CUDA, so
    nothing here links it; it must at least compile, with binding.cpp's CUDA registrations,
    against torch's headers (the CPU wheel ships c10/cuda/ but not the one CMake-generated
    header, stubbed here) and the toolkit's."""
    import sysconfig

    torch_ext = pytest.importorskip("torch.utils.cpp_extension")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    from tests.integration.cuda_emu import CUDA_INCLUDE as cuda_include  # CUDA_HOME's, else /usr/local/cuda's

    flags = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wno-unknown-pragmas", "-DDPFACE_WITH_CUDA",
             "-DDPFACE_CUDA_ARCHS=sm_80+sm_90", *(f"-I{p}" for p in torch_ext.include_paths()),
             f"-I{tmp_path}", f"-I{cuda_include}", f"-I{CSRC}", f"-I{sysconfig.get_paths()['include']}"]
    for src in ("cuda_ops.cpp", "binding.cpp"):
        proc = _run([*flags, str(CSRC / src)], ROOT)
        assert proc.returncode == 0, f"{src} does not compile for a CUDA build:\n{proc.stderr[-4000:]}"
        ours = [line for line in proc.stderr.splitlines() if "warning" in line and str(CSRC) in line]
        assert not ours, "\n".join(ours)


def test_memcheck_driver_links_with_nvcc(objects, tmp_path):
    """benchmarks/device_check.sh runs tests/integration/cuda_memcheck.cu under compute-sanitizer: it
    must build with nvcc against the kernels' objects (it runs on the emulator in CI)."""
    objs = [str(objects(cu)[1]) for cu in CU_FILES]
    prog = tmp_path / "cuda_memcheck"
    cmd = [NVCC, "-std=c++17", "-arch=sm_90", "-I", str(CUDA_DIR), "-I", str(CSRC),
           str(ROOT / "tests" / "integration" / "cuda_memcheck.cu"), *objs, "-o", str(prog)]
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0 and prog.is_file(), proc.stderr
