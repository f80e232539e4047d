"""Every CUDA kernel executed on the CPU: the .cu files compiled by g++ against the
emulator (kernels/emu/), under AddressSanitizer and UBSan, called through their C
interface and checked against float64 references (tests/integration/cuda_emu.py).

What the emulator does not cover (kernels/emu/README.md): the real hardware's timing,
memory model and instruction set (it checks semantics, not speed), atomics (the kernels
have none), the exact tensor-core accumulation order (products and sums in fp32 here).
"""
from __future__ import annotations

import concurrent.futures
import shutil

import numpy as np
import pytest

from tests.integration import cuda_emu

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or not cuda_emu.cuda_headers_found(),
                                reason="needs g++ and the CUDA toolkit's headers (cuda_runtime.h, cuda_bf16.h)")

MARGIN_CU = cuda_emu.CSRC / "cuda" / "margin_softmax.cu"
CHUNK_CU = cuda_emu.CSRC / "cuda" / "chunk_epilogue.cu"


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_emu")


@pytest.fixture(scope="module")
def libs(build_dir):
    """(production constants, small tile constants), both under ASan + UBSan."""
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        prod = ex.submit(cuda_emu.build, build_dir)
        small = ex.submit(cuda_emu.build, build_dir, defines=tuple(cuda_emu.SMALL_TILES))
        return prod.result(), small.result()


@pytest.fixture(scope="module")
def results(libs):
    res, proc = cuda_emu.run_cases(libs[0], list(cuda_emu.CASES), small_lib=libs[1])
    return res, proc


@pytest.mark.parametrize("case", list(cuda_emu.CASES))
def test_kernel_equals_float64_reference(results, case):
    res, proc = results
    assert case in res, f"the run stopped before {case} (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    r = res[case]
    assert r["ok"], f"{case}: {r['errors']} (max relative errors {r['max_rel_err']})"


def test_no_sanitizer_report(results):
    res, proc = results
    assert proc.returncode == 0 and "Sanitizer" not in proc.stderr, proc.stderr[-4000:]


DETERMINISM_CASES = ["many_tiles_wmma", "many_tiles_f32", "split_x_f32", "sampled_keep_part_f32",
                     "cosface_bf16io", "chunked_arcface", "range_f32", "range_f64"]


def test_bit_identical_whatever_the_schedule(libs, tmp_path):
    """The kernels claim determinism (no atomics, fixed reduction orders): outputs are the
    same bits with blocks and threads in index order on one OS thread, and with blocks and
    the fibers' resumption order shuffled, on two OS threads."""
    dumps = []
    for seed, threads in ((0, 1), (12345, 2)):
        out = tmp_path / f"seed{seed}.npz"
        res, proc = cuda_emu.run_cases(libs[0], DETERMINISM_CASES, small_lib=libs[1], seed=seed,
                                       threads=threads, dump=out)
        assert all(res.get(c, {}).get("ok") for c in DETERMINISM_CASES), (res, proc.stderr[-3000:])
        dumps.append(np.load(out))
    a, b = dumps
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 40
    for k in a.files:
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs between schedules"


# Planted bugs: each mutation of a .cu file (margin_softmax.cu unless named) must be
# caught, and how.
PLANTED = {
    "dropped barrier in the chunked forward's row reduction (chunk_epilogue.cu)": (
        "      sx[threadIdx.x] = nanmax(sx[threadIdx.x], sx[threadIdx.x + o]);\n    }\n    __syncthreads();\n",
        "      sx[threadIdx.x] = nanmax(sx[threadIdx.x], sx[threadIdx.x + o]);\n    }\n",
        "chunked_arcface", "wrong"),
    "dropped barrier after the k-slice loads (SIMT GEMM)": (
        "      load_slice<false>(sm.ab.b, sb, n0, k0);\n      __syncthreads();\n",
        "      load_slice<false>(sm.ab.b, sb, n0, k0);\n",
        "ragged_arcface_f32", "wrong"),
    "dropped barrier before the next tile reuses shared memory (forward)": (
        "    __syncthreads();  // sm.c is overwritten by the next tile's k-slices\n", "\n",
        "many_tiles_f32", "wrong"),
    "out-of-bounds tile read (row bound check removed)": (
        "    if (m >= rows || k >= kdim) return 0.f;\n    const int64_t r = idx ? idx[off + m] : off + m;",
        "    if (k >= kdim) return 0.f;\n    const int64_t r = idx ? idx[off + m] : off + m;",
        "ragged_arcface_f32", "AddressSanitizer: heap-buffer-overflow"),
    "WMMA layout slip (A fragment row-major)": (
        "wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16_t, wmma::col_major> fa[2];",
        "wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16_t, wmma::row_major> fa[2];",
        "ragged_arcface_wmma", "wrong"),
    "barrier inside a branch some threads skip": (
        "        if (j >= a.K) break;\n", "        if (j >= a.K) break;\n        __syncthreads();\n",
        "ragged_arcface_f32", "dpface cuda emu:"),
}


@pytest.fixture(scope="module")
def planted_runs(build_dir):
    def one(item):
        name, (old, new, case, _) = item
        cu = CHUNK_CU if "chunk_epilogue.cu" in name else MARGIN_CU
        src = cu.read_text()
        assert src.count(old) == 1, f"planted bug '{name}': the source changed, update the mutation"
        small = cuda_emu.CASES[case][1].get("small", False)
        defines = tuple(cuda_emu.SMALL_TILES) if small else ()
        lib = cuda_emu.build(build_dir, defines=defines, sources={cu.name: src.replace(old, new)})
        return name, cuda_emu.run_cases(lib, [case], small_lib=lib if small else None)

    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        return dict(ex.map(one, PLANTED.items()))


@pytest.mark.parametrize("name", list(PLANTED))
def test_planted_bug_is_caught(planted_runs, name):
    _, _, case, expect = PLANTED[name]
    res, proc = planted_runs[name]
    if expect == "wrong":
        assert proc.returncode == 0 and case in res, proc.stderr[-3000:]
        assert not res[case]["ok"], f"'{name}' went unnoticed: {res[case]}"
    else:
        assert case not in res and proc.returncode != 0, f"'{name}' went unnoticed: {res}"
        assert expect in proc.stderr, proc.stderr[-3000:]


def test_memcheck_driver_runs_clean_under_asan(build_dir):
    """The device script runs tests/integration/cuda_memcheck.cu under compute-sanitizer; here the same
    program runs on the emulated kernels under AddressSanitizer and UBSan."""
    import os
    import subprocess

    prog = cuda_emu.build_program(build_dir, cuda_emu.ROOT / "tests" / "integration" / "cuda_memcheck.cu")
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1", "UBSAN_OPTIONS": "halt_on_error=1"}
    proc = subprocess.run([str(prog)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "every entry point ran" in proc.stdout and "Sanitizer" not in proc.stderr
