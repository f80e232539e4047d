"""The CUDA kernels (kernels/csrc/cuda/*.cu) run on the CPU through the emulator
(kernels/emu/), driven through their C interface (dpface_cuda.h) with ctypes and checked
against float64 references written here with numpy, independently of dpface/ops.

Two halves: `build()` compiles the .cu files with g++ into a shared library (normally
under ASan and UBSan), and `main()` runs named cases in a child process that has the
sanitizer runtime preloaded (`run_cases()` starts it) and prints one JSON line per case.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "kernels" / "csrc"
EMU = ROOT / "kernels" / "emu"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
# The tile/chunk constants of margin_softmax.cu, shrunk so that tiny problems reach the
# paths large ones take (several tiles per column block, several backward chunks, split
# grad_x reductions).
SMALL_TILES = ["-DDPFACE_FWD_TARGET_BLOCKS=2", "-DDPFACE_BWD_CHUNK_ELEMS=8192", "-DDPFACE_X_TARGET_BLOCKS=64",
               "-DDPFACE_X_MIN_SPAN=32"]


def cuda_headers_found() -> bool:
    return (CUDA_INCLUDE / "cuda_runtime.h").is_file() and (CUDA_INCLUDE / "cuda_bf16.h").is_file()


def _compile(src: Path, obj: Path, flags: list[str], cu: bool) -> subprocess.Popen:
    cmd = ["g++", "-std=c++17", "-O1", "-g", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Wno-sign-compare",
           f"-I{CUDA_INCLUDE}", f"-I{CSRC}", f"-I{EMU}", *flags]
    if cu:
        cmd += ["-x", "c++", "-include", str(EMU / "cuda_emu.h")]
    return subprocess.Popen([*cmd, "-c", str(src), "-o", str(obj)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def build(out_dir: Path, *, sanitize: bool = True, defines: tuple[str, ...] = (),
          sources: dict[str, str] | None = None) -> Path:
    """The emulated kernels as one shared library. ``sources`` replaces the text of .cu
    files by name (the planted-bug tests); ``defines`` adds -D flags. Objects and the
    library are cached in ``out_dir`` by content, so a variant recompiles only what differs."""
    flags = [*(SANITIZE if sanitize else []), *defines]
    objs = _objects(out_dir, flags, sources)
    return _link(out_dir, flags, objs, "libdpface_cuda_emu", ["-shared"], ".so")


def build_program(out_dir: Path, main: Path, *, sanitize: bool = True) -> Path:
    """An executable of ``main`` (host code calling dpface_cuda.h) linked with the emulated
    kernels: the device script's memcheck driver, run here under ASan."""
    flags = list(SANITIZE if sanitize else [])
    objs = _objects(out_dir, flags, None, extra={main.name: main.read_text()})
    return _link(out_dir, flags, objs, main.stem, [], "")


def _link(out_dir: Path, flags: list[str], objs: list[Path], stem: str, kind: list[str], suffix: str) -> Path:
    out = out_dir / f"{stem}-{hashlib.sha256(''.join(map(str, objs)).encode()).hexdigest()[:16]}{suffix}"
    if not out.is_file():
        tmp = out.with_name(out.name + ".tmp")
        link = subprocess.run(["g++", *kind, *flags[:1], "-o", str(tmp), *map(str, objs), "-lpthread"],
                              capture_output=True, text=True)
        if link.returncode != 0:
            raise RuntimeError(f"linking the emulated kernels failed:\n{link.stderr}")
        tmp.rename(out)
    return out


def _objects(out_dir: Path, flags: list[str], sources: dict[str, str] | None,
             extra: dict[str, str] | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    emu_h = (EMU / "cuda_emu.h").read_text()
    texts = {p.name: p.read_text() for p in sorted((CSRC / "cuda").glob("*.cu"))}
    texts.update(sources or {})
    texts["cuda_emu.cpp"] = (EMU / "cuda_emu.cpp").read_text()
    texts.update(extra or {})
    headers = {p.name: p.read_text() for p in sorted([*(CSRC / "cuda").glob("*.h"), *(CSRC / "cuda").glob("*.cuh"),
                                                      CSRC / "margin_math.h"])}
    jobs, objs = [], []
    for name, text in texts.items():
        key = hashlib.sha256(json.dumps([flags, name, text, emu_h, headers]).encode()).hexdigest()[:16]
        obj = out_dir / f"{Path(name).stem}-{key}.o"
        objs.append(obj)
        if obj.is_file():
            continue
        src = out_dir / f"{Path(name).stem}-{key}{Path(name).suffix}"
        src.write_text(text)
        tmp = obj.with_suffix(".o.tmp")
        jobs.append((name, tmp, obj, _compile(src, tmp, [*flags, f"-I{CSRC / 'cuda'}"], cu=name.endswith(".cu"))))
    for name, tmp, obj, p in jobs:
        log, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"g++ failed on {name}:\n{log}")
        tmp.rename(obj)
    return objs


def run_cases(lib: Path, cases: list[str], *, small_lib: Path | None = None, sanitize: bool = True,
              seed: int = 0, threads: int = 0, dump: Path | None = None,
              timeout: float = 600) -> tuple[dict, subprocess.CompletedProcess]:
    """Runs ``cases`` in a child process (the sanitizer runtime preloaded); returns
    ({case: result}, the finished process, whose stderr holds any sanitizer report)."""
    env = dict(os.environ)
    if sanitize:
        asan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
        env["LD_PRELOAD"] = asan
        # Python itself leaks at exit; the kernels' own reads and writes are what is checked.
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1:allocator_may_return_null=1"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "tests.integration.cuda_emu", str(lib), "--seed", str(seed), "--threads", str(threads)]
    cmd += ["--small-lib", str(small_lib)] if small_lib else []
    cmd += ["--dump", str(dump)] if dump else []
    cmd += list(cases)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["case"]] = r
    return results, proc


# ---- the device: the C interface through ctypes ------------------------------------------

class Params(ctypes.Structure):
    _fields_ = [("s", ctypes.c_double), ("m1", ctypes.c_double), ("m2", ctypes.c_double),
                ("m3", ctypes.c_double), ("t", ctypes.c_double), ("easy_margin", ctypes.c_int),
                ("angle_clip", ctypes.c_int), ("normalize", ctypes.c_int), ("bf16", ctypes.c_int),
                ("sample_scale", ctypes.c_void_p), ("sample_margin", ctypes.c_void_p),
                ("hard_threshold", ctypes.c_void_p)]


def params(dev: "Device", p: dict, bf16: int) -> Params:
    """The C struct of margin ``p``, its per-sample arrays copied to the device."""
    def arr(key):
        return dev.put(None if p.get(key) is None else np.asarray(p[key], np.float32)) or None

    return Params(p["s"], p["m1"], p["m2"], p["m3"], p.get("t", 0.0), int(p["easy_margin"]),
                  int(p.get("clip", 0)), int(p["normalize"]), bf16, arr("scale"), arr("margin"), arr("hard"))


class Device:
    """Device buffers of exactly the requested size (cudaMalloc: malloc under ASan)."""

    def __init__(self, lib: Path, seed: int = 0, threads: int = 0):
        self.lib = ctypes.CDLL(str(lib))
        self.lib.dpface_emu_configure(ctypes.c_ulonglong(seed), ctypes.c_int(threads))
        self.lib.dpface_cuda_error_string.restype = ctypes.c_char_p
        self.live: list[int] = []

    def alloc(self, nbytes: int) -> int:
        p = ctypes.c_void_p()
        assert self.lib.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(nbytes)) == 0
        self.live.append(p.value or 0)
        return p.value or 0

    def put(self, a: np.ndarray | None) -> int:
        if a is None:
            return 0
        a = np.ascontiguousarray(a)
        p = self.alloc(a.nbytes)
        if a.nbytes:
            ctypes.memmove(p, a.ctypes.data, a.nbytes)
        return p

    def empty(self, shape, dtype) -> tuple[int, tuple, np.dtype]:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        p = self.alloc(n)
        if n:
            ctypes.memset(p, 0xFF, n)  # NaN pattern: an output the kernel forgets shows up
        return (p, tuple(shape), dtype)

    @staticmethod
    def get(buf) -> np.ndarray:
        p, shape, dtype = buf
        out = np.empty(shape, dtype)
        if out.nbytes:
            ctypes.memmove(out.ctypes.data, p, out.nbytes)
        return out

    def free(self):
        for p in self.live:
            self.lib.cudaFree(ctypes.c_void_p(p))
        self.live.clear()

    def check(self, rc: int, what: str):
        if rc != 0:
            raise RuntimeError(f"{what}: {self.lib.dpface_cuda_error_string(rc).decode()} (code {rc})")


def i64(v) -> ctypes.c_int64:
    return ctypes.c_int64(int(v))


def ptr(p) -> ctypes.c_void_p:
    return ctypes.c_void_p(p[0] if isinstance(p, tuple) else p)


# ---- bf16 -------------------------------------------------------------------------------

def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (NaN kept quiet)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    r[nan] = 0x7FC0
    return r


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def round_bf16(a: np.ndarray) -> np.ndarray:
    return from_bf16_bits(to_bf16_bits(a.astype(np.float32))).astype(np.float64)


# ---- float64 references ------------------------------------------------------------------

COS_EPS = 1e-7


def psi64(c, m1, m2, m3, easy, clip=False):
    """cos(m1·θ + m2) − m3 on the target cosine (LOSSES.md), with the clamp to [−1+ε, 1−ε],
    the monotone fallback once m1·θ + m2 passes π (or, with ``clip``, AdaFace's angle clamped
    to [ε, π − ε]), and easy margin. m1, m2, m3: scalars or one value per element of c."""
    m1, m2, m3 = (np.broadcast_to(np.asarray(m, np.float64), np.shape(c)) for m in (m1, m2, m3))
    cc = np.clip(c, -1 + COS_EPS, 1 - COS_EPS)
    theta = np.arccos(cc)
    if clip:
        out = np.cos(np.clip(m1 * theta + m2, COS_EPS, math.pi - COS_EPS)) - m3
    else:
        theta_star = np.minimum(math.pi, (math.pi - m2) / m1)
        # ArcFace's CosFace-like penalty past π − m for m1 = 1, else meeting −1 − m3 at θ*
        fallback = np.where(m1 == 1.0, cc - m2 * np.sin(m2), cc - (np.cos(theta_star) + 1.0))
        out = np.where(theta < theta_star, np.cos(m1 * theta + m2), fallback) - m3
        out = np.where((m1 == 1.0) & (m2 == 0.0), c - m3, out)
    return np.where(cc > 0, out, c) if easy else out


def dpsi64(c, m1, m2, m3, easy, clip=False):
    """d psi / d c: the derivative of the expression above, branch by branch."""
    m1, m2 = (np.broadcast_to(np.asarray(m, np.float64), np.shape(c)) for m in (m1, m2))
    lo, hi = -1 + COS_EPS, 1 - COS_EPS
    cc = np.clip(c, lo, hi)
    inside = ((c >= lo) & (c <= hi)).astype(np.float64)
    theta = np.arccos(cc)
    angle = m1 * theta + m2
    if clip:
        d = np.where((angle < COS_EPS) | (angle > math.pi - COS_EPS), 0.0, inside * m1 * np.sin(angle) / np.sin(theta))
    else:
        theta_star = np.minimum(math.pi, (math.pi - m2) / m1)
        d = inside * np.where(theta < theta_star, m1 * np.sin(angle) / np.sqrt(1 - cc * cc), 1.0)
        d = np.where((m1 == 1.0) & (m2 == 0.0), 1.0, d)
    return np.where(cc > 0, d, 1.0) if easy else d


def rows_of(p, B):
    """Each row's (s, m1, m2, m3): the per-sample arrays where given, else the scalars."""
    s = np.asarray(p["scale"], np.float64) if p.get("scale") is not None else np.full(B, p["s"])
    m = np.asarray(p["margin"], np.float64) if p.get("margin") is not None else \
        np.tile([p["m1"], p["m2"], p["m3"]], (B, 1))
    return s, m


def negatives64(scores, p):
    """CurricularFace's hard negatives (c above the row's threshold: c·(t + c)) and d/dc."""
    if p.get("hard") is None:
        return scores, np.ones_like(scores)
    hard = np.asarray(p["hard"], np.float64)[:, None]
    t = p["t"]
    above = scores > hard
    return np.where(above, scores * (t + scores), scores), np.where(above, t + 2 * scores, 1.0)


def margin_ref(x, w, idx, target, bias, p, keep, bf16):
    """Forward and the pieces of backward in float64 (kernels/OPS.md)."""
    rows = w if idx is None else w[idx]
    xg = round_bf16(x) if bf16 else x.astype(np.float64)
    rg = round_bf16(rows) if bf16 else rows.astype(np.float64)
    rows64 = rows.astype(np.float64)
    B, K = x.shape[0], rows.shape[0]
    if p["normalize"]:
        inv = 1.0 / np.maximum(np.linalg.norm(rows64, axis=1), 1e-12)
        scores = (xg @ rg.T) * inv
    else:
        inv = np.ones(K)
        scores = xg @ rg.T + (0 if bias is None else (bias if idx is None else bias[idx]).astype(np.float64))
    has = target >= 0
    t = np.where(has, target, 0)
    s_row, m_row = rows_of(p, B)
    neg, dneg = negatives64(scores, p)
    z = s_row[:, None] * neg
    ts = np.where(has, scores[np.arange(B), np.minimum(t, max(K - 1, 0))] if K else 0.0, 0.0)
    args = (m_row[:, 0], m_row[:, 1], m_row[:, 2], bool(p["easy_margin"]), bool(p.get("clip", 0)))
    tl = s_row * psi64(ts, *args)
    if K:
        z[has, t[has]] = tl[has]
        mx = z.max(1, keepdims=True)
        lse = (mx[:, 0] + np.log(np.exp(z - mx).sum(1)))
        max_score = scores.max(1)
    else:
        lse = np.full(B, -np.inf)
        max_score = np.full(B, -np.inf)
    return dict(lse=lse, target_logit=np.where(has, tl, 0.0), target_score=ts, max_score=max_score,
                inv_norm=inv, saved=scores[:, :keep], z=z, dneg=dneg, scores=scores, xg=xg, rg=rg, rows64=rows64,
                has=has, t=t, s_row=s_row, args=args)


def margin_grad_ref(ref, g_lse, g_t, p, bf16):
    z, K = ref["z"], ref["z"].shape[1]
    has, t = ref["has"], ref["t"]
    prob = np.exp(z - ref["lse"][:, None]) if K else z
    G = g_lse[:, None] * prob
    s_row = ref["s_row"]
    dscore = s_row[:, None] * G * ref["dneg"]
    if K:
        G_t = G[has, t[has]] + g_t[has]
        args = tuple(a[has] if isinstance(a, np.ndarray) else a for a in ref["args"])
        dscore[has, t[has]] = s_row[has] * dpsi64(ref["target_score"][has], *args) * G_t
    if p["normalize"]:
        da = dscore * ref["inv_norm"]
        if bf16:
            da = round_bf16(da)
        gx = da @ ref["rg"]
        M = da.T @ ref["xg"]
        r = ref["rows64"]
        coef = (r * M).sum(1) * ref["inv_norm"] ** 2
        grows = M - coef[:, None] * r
        gbias = None
        # The projection cancels most of M where M is nearly parallel to the row: its
        # rounding error scales with |M|, not with the (small) result.
        rows_scale = float(np.abs(M).max()) if M.size else 0.0
    else:
        da = round_bf16(dscore) if bf16 else dscore
        gx = da @ ref["rg"]
        grows = da.T @ ref["xg"]
        gbias = dscore.sum(0)
        rows_scale = 0.0
    return dict(grad_x=gx, grad_rows=grows, grad_bias=gbias, rows_scale=rows_scale)


def range_ref(x, labels, k, margin):
    """(intra, inter) and d/dx of each, in float64 by central differences of the closed
    form (the closed form itself: per identity the harmonic mean of its k largest pair
    distances times k; the hinge on the closest pair of identity means)."""
    x = x.astype(np.float64)

    def terms(x):
        intra, inter = 0.0, 0.0
        ids = np.unique(labels)
        for g in ids:
            xi = x[labels == g]
            n = len(xi)
            if n < 2:
                continue
            d = np.array([math.sqrt(max(((xi[a] - xi[b]) ** 2).sum(), 1e-12))
                          for a in range(n) for b in range(a + 1, n)])
            top = np.sort(d)[::-1][:min(k, len(d))]
            intra += len(top) / (1.0 / top).sum()
        if len(ids) >= 2:
            c = np.stack([x[labels == g].mean(0) for g in ids])
            dmin = min(((c[a] - c[b]) ** 2).sum() for a in range(len(ids)) for b in range(a + 1, len(ids)))
            inter = max(margin - dmin, 0.0)
        return intra, inter

    intra, inter = terms(x)
    h = 1e-6
    g_intra, g_inter = np.zeros_like(x), np.zeros_like(x)
    for i in range(x.shape[0]):
        for d in range(x.shape[1]):
            xp, xm = x.copy(), x.copy()
            xp[i, d] += h
            xm[i, d] -= h
            a, b = terms(xp), terms(xm)
            g_intra[i, d] = (a[0] - b[0]) / (2 * h)
            g_inter[i, d] = (a[1] - b[1]) / (2 * h)
    return intra, inter, g_intra, g_inter


# ---- the calls --------------------------------------------------------------------------

def margin_call(dev: Device, x, w, idx, target, bias, p, keep, mode, g_lse, g_t):
    """mode: "f32" (SIMT), "f32_bf16" (fp32 inputs, bf16 tensor-core GEMMs), "bf16" (bf16
    inputs and outputs). Returns every output of forward and backward as numpy."""
    L = dev.lib
    B, D = x.shape
    K = len(idx) if idx is not None else w.shape[0]
    n_keep = min(K, keep)
    io_bf16 = mode == "bf16"
    prm = params(dev, p, int(mode != "f32"))
    xs = to_bf16_bits(x) if io_bf16 else x.astype(np.float32)
    ws = to_bf16_bits(w) if io_bf16 else w.astype(np.float32)
    dx, dw = dev.put(xs), dev.put(ws)
    didx = dev.put(None if idx is None else idx.astype(np.int64))
    dt = dev.put(target.astype(np.int64))
    db = dev.put(None if bias is None else bias.astype(np.float32))
    out = {k: dev.empty(s, np.float32) for k, s in
           dict(lse=(B,), target_logit=(B,), target_score=(B,), max_score=(B,), inv_norm=(K,)).items()}
    out["saved"] = dev.empty((B, n_keep), np.float32)
    nbytes = ctypes.c_size_t()
    dev.check(L.dpface_margin_softmax_fwd_workspace(i64(B), i64(K), i64(D), ctypes.byref(nbytes)), "fwd workspace")
    ws_f = dev.alloc(nbytes.value)
    fwd = L.dpface_margin_softmax_fwd_bf16 if io_bf16 else L.dpface_margin_softmax_fwd_f32
    dev.check(fwd(ptr(dx), ptr(dw), ptr(didx), ptr(dt), ptr(db), i64(B), i64(K), i64(D), i64(n_keep),
                  ctypes.byref(prm), *(ptr(out[k]) for k in ("lse", "target_logit", "target_score", "max_score",
                                                               "inv_norm", "saved")),
                  ptr(ws_f), ctypes.c_size_t(nbytes.value), None), "forward")
    res = {k: Device.get(v) for k, v in out.items()}
    gl, gt = dev.put(g_lse.astype(np.float32)), dev.put(g_t.astype(np.float32))
    bdt = np.uint16 if io_bf16 else np.float32
    gx, gr = dev.empty((B, D), bdt), dev.empty((K, D), bdt)
    gb = dev.empty((K,), np.float32) if bias is not None else (0, (0,), np.dtype(np.float32))
    dev.check(L.dpface_margin_softmax_bwd_workspace(i64(B), i64(K), i64(D), ctypes.c_int(int(io_bf16)),
                                                     ctypes.byref(nbytes)), "bwd workspace")
    ws_b = dev.alloc(nbytes.value)
    bwd = L.dpface_margin_softmax_bwd_bf16 if io_bf16 else L.dpface_margin_softmax_bwd_f32
    dev.check(bwd(ptr(gl), ptr(gt), ptr(out["lse"]), ptr(dx), ptr(dw), ptr(didx), ptr(dt), ptr(db),
                  ptr(out["inv_norm"]), ptr(out["saved"]), i64(B), i64(K), i64(D), i64(n_keep), ctypes.byref(prm),
                  ptr(gx), ptr(gr), ptr(gb), ptr(ws_b), ctypes.c_size_t(nbytes.value), None), "backward")
    res["grad_x"], res["grad_rows"] = Device.get(gx), Device.get(gr)
    if io_bf16:
        res["grad_x"], res["grad_rows"] = from_bf16_bits(res["grad_x"]), from_bf16_bits(res["grad_rows"])
    if bias is not None:
        res["grad_bias"] = Device.get(gb)
    dev.free()
    return res


def chunked_call(dev: Device, x, w, idx, target, bias, p, keep, mode, g_lse, g_t, width):
    """head.kernel=chunked as dpface/ops/chunked.py runs it on a GPU: the GEMMs in float32
    (numpy standing in for cuBLAS; bf16: on bf16-rounded operands, fp32 accumulation), the
    epilogues in the emulated kernels of chunk_epilogue.cu."""
    L = dev.lib
    B = x.shape[0]
    rows_all = (w if idx is None else w[idx]).astype(np.float32)
    K = rows_all.shape[0]
    n_keep = min(K, keep)
    rnd = mode != "f32"
    prm = params(dev, p, 0)

    def op(a):
        return round_bf16(a).astype(np.float32) if rnd else a.astype(np.float32)

    xg = op(x)
    inv = (1.0 / np.maximum(np.linalg.norm(rows_all.astype(np.float64), axis=1), 1e-12)).astype(np.float32)
    b_all = None if bias is None else (bias if idx is None else bias[idx]).astype(np.float32)
    dt = dev.put(target.astype(np.int64))
    stats = {k: dev.put(np.full(B, v, np.float32)) for k, v in
             dict(run_max=-np.inf, run_sum=0.0, max_score=-np.inf, target_logit=0.0, target_score=0.0).items()}
    saved = dev.empty((B, n_keep), np.float32)
    for c0 in range(0, K, width):
        c1 = min(c0 + width, K)
        scores = (xg @ op(rows_all[c0:c1]).T).astype(np.float32)
        dev.check(L.dpface_chunk_fwd_epilogue(
            ptr(dev.put(scores)), i64(B), i64(c1 - c0), i64(c0), ptr(dev.put(inv[c0:c1]) if p["normalize"] else 0),
            ptr(dev.put(None if b_all is None else b_all[c0:c1])), ptr(dt), ctypes.byref(prm), ptr(saved),
            i64(n_keep), *(ptr(stats[k]) for k in ("run_max", "run_sum", "max_score", "target_logit",
                                                   "target_score")), None), "chunk forward epilogue")
    got = {k: Device.get((v, (B,), np.dtype(np.float32))) for k, v in stats.items()}
    got["lse"] = (got["run_max"] + np.log(got["run_sum"])) if K else got["run_max"]
    got["saved"] = Device.get(saved)
    got["inv_norm"] = inv if p["normalize"] else np.ones(K, np.float32)
    d_lse, d_ts = dev.put(got["lse"].astype(np.float32)), dev.put(got["target_score"])
    d_gl, d_gt = dev.put(g_lse.astype(np.float32)), dev.put(g_t.astype(np.float32))
    gx = np.zeros(x.shape, np.float32)
    grows = np.zeros(rows_all.shape, np.float32)
    gb = np.zeros(K, np.float32)
    saved_host = got["saved"]
    for lo, hi in ((0, n_keep), (n_keep, K)):
        for c0 in range(lo, hi, width):
            c1 = min(c0 + width, hi)
            n = c1 - c0
            from_saved = c0 < n_keep
            src = np.ascontiguousarray(saved_host[:, c0:c1]) if from_saved else \
                (xg @ op(rows_all[c0:c1]).T).astype(np.float32)
            da = dev.empty((B, n), np.float32)
            dev.check(L.dpface_chunk_bwd_epilogue(
                ptr(dev.put(src)), i64(n), ctypes.c_int(int(from_saved)), i64(B), i64(n), i64(c0),
                ptr(dev.put(inv[c0:c1]) if p["normalize"] else 0),
                ptr(dev.put(None if b_all is None else b_all[c0:c1])), ptr(dt), ptr(d_ts), ptr(d_lse),
                ptr(d_gl), ptr(d_gt), ctypes.byref(prm), ptr(da), None), "chunk backward epilogue")
            da = Device.get(da)
            gb[c0:c1] = da.sum(0)
            dag = op(da)
            gx += dag @ op(rows_all[c0:c1])
            M = (dag.T @ xg).astype(np.float32)
            if p["normalize"]:
                r = rows_all[c0:c1]
                M -= ((r * M).sum(1) * inv[c0:c1] ** 2)[:, None] * r
            grows[c0:c1] = M
    got.update(grad_x=gx, grad_rows=grows)
    if bias is not None:
        got["grad_bias"] = gb
    dev.free()
    return {k: v for k, v in got.items() if k not in ("run_max", "run_sum")}


def range_call(dev: Device, x, labels, k, margin, g_intra, g_inter, f64: bool):
    L = dev.lib
    N, D = x.shape
    dt = np.float64 if f64 else np.float32
    suffix = "f64" if f64 else "f32"
    dx, dl = dev.put(x.astype(dt)), dev.put(labels.astype(np.int64))
    intra, inter = dev.empty((), dt), dev.empty((), dt)
    nbytes = ctypes.c_size_t()
    dev.check(L.dpface_range_loss_workspace(i64(N), i64(D), i64(k), ctypes.c_int(int(f64)), ctypes.byref(nbytes)),
              "range workspace")
    ws = dev.alloc(nbytes.value)
    dev.check(getattr(L, f"dpface_range_loss_fwd_{suffix}")(ptr(dx), ptr(dl), i64(N), i64(D), i64(k),
                                                            ctypes.c_double(margin), ptr(intra), ptr(inter), ptr(ws),
                                                            ctypes.c_size_t(nbytes.value), None), "range forward")
    gi, ge = dev.put(np.array(g_intra, dt)), dev.put(np.array(g_inter, dt))
    gx = dev.empty((N, D), dt)
    dev.check(getattr(L, f"dpface_range_loss_bwd_{suffix}")(ptr(gi), ptr(ge), ptr(dx), ptr(dl), i64(N), i64(D),
                                                            i64(k), ctypes.c_double(margin), ptr(gx), ptr(ws),
                                                            ctypes.c_size_t(nbytes.value), None), "range backward")
    res = dict(intra=float(Device.get(intra)), inter=float(Device.get(inter)), grad_x=Device.get(gx))
    dev.free()
    return res


# ---- the cases --------------------------------------------------------------------------

MARGINS = {
    "softmax": dict(s=1.0, m1=1.0, m2=0.0, m3=0.0, easy_margin=0, normalize=0),
    "cosface": dict(s=64.0, m1=1.0, m2=0.0, m3=0.35, easy_margin=0, normalize=1),
    "arcface": dict(s=64.0, m1=1.0, m2=0.5, m3=0.0, easy_margin=0, normalize=1),
    "arcface_easy": dict(s=32.0, m1=1.0, m2=0.5, m3=0.0, easy_margin=1, normalize=1),
    "combined": dict(s=32.0, m1=1.0, m2=0.3, m3=0.2, easy_margin=0, normalize=1),
    "multiplicative": dict(s=16.0, m1=1.35, m2=0.25, m3=0.1, easy_margin=0, normalize=1),
}


def per_sample(name, B, seed):
    """The adaptive margins' per-sample parameters (as dpface.losses.adaptive hands them to
    the op), arbitrary values in their ranges: AdaFace's clipped angle with m2 of either sign,
    MagFace's / ElasticFace's per-sample margins, CurricularFace's hard negatives, scales."""
    rng = np.random.default_rng(seed + 1000)
    one, zero = np.ones(B), np.zeros(B)
    base = dict(s=64.0, m1=1.0, m2=0.0, m3=0.0, easy_margin=0, normalize=1)
    if name == "adaface":
        z = rng.uniform(-1, 1, B)
        return dict(base, clip=1, margin=np.stack([one, -0.4 * z, 0.4 * z + 0.4], 1))
    if name == "magface":
        return dict(base, margin=np.stack([one, rng.uniform(0.45, 0.8, B), zero], 1))
    if name == "elastic_cos":
        return dict(base, margin=np.stack([one, zero, rng.normal(0.35, 0.05, B)], 1))
    if name == "curricular":
        return dict(base, m2=0.5, hard=rng.uniform(-0.3, 0.6, B), t=0.3)
    if name == "scaled_all":
        return dict(base, s=1.0, clip=1, scale=rng.uniform(16, 64, B),
                    margin=np.stack([one, rng.uniform(-0.4, 0.4, B), rng.uniform(0, 0.3, B)], 1),
                    hard=rng.uniform(-0.2, 0.5, B), t=0.7)
    raise KeyError(name)


def margin_problem(seed, B, K, D, C=None, margin="arcface", sampled=False, bias=False, minus_one=0.2,
                   obtuse=False):
    """x unit rows, w raw rows; targets in [-1, K) with repeats; with ``obtuse`` half the
    targets sit at θ > π − m (ArcFace's fallback side), the others at small θ."""
    rng = np.random.default_rng(seed)
    C = C or K
    x = rng.standard_normal((B, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w = rng.standard_normal((C, D)) * rng.uniform(0.5, 2.0, (C, 1))
    idx = np.sort(rng.choice(C, K, replace=False)) if sampled else None
    target = rng.integers(0, max(K, 1), B) if K else np.full(B, -1)
    if K:
        target[rng.random(B) < minus_one] = -1
        if B > 3:
            target[1] = target[0] if target[0] >= 0 else 0  # repeated labels
    rows = w if idx is None else w[idx]
    if K and margin != "softmax" and D > 1:
        # steer some samples towards (or, with obtuse, away from) their target row
        for i in range(B):
            if target[i] < 0:
                continue
            r = rows[target[i]] / np.linalg.norm(rows[target[i]])
            a = rng.uniform(0.3, 0.9) if not (obtuse and i % 2) else -rng.uniform(0.95, 0.999)
            v = x[i] - (x[i] @ r) * r
            v /= np.linalg.norm(v)
            x[i] = a * r + math.sqrt(1 - a * a) * v
    b = rng.standard_normal(C) * 0.1 if bias else None
    g_lse = rng.uniform(0.2, 1.0, B)
    g_t = -rng.uniform(0.2, 1.0, B) * (target >= 0)
    return x, w, idx, target, b, g_lse, g_t


def margin_case(B, K, D, margin="arcface", mode="f32", keep=0, **kw):
    return ("margin", dict(B=B, K=K, D=D, margin=margin, mode=mode, keep=keep, **kw))


CASES = {
    # shapes that are not multiples of the 64x64x32 tiles, every margin, both GEMM paths
    "ragged_arcface_f32": margin_case(70, 150, 40),
    "ragged_arcface_wmma": margin_case(70, 150, 40, mode="f32_bf16"),
    "ragged_arcface_bf16io": margin_case(70, 150, 40, mode="bf16"),
    "softmax_bias_f32": margin_case(33, 97, 24, margin="softmax", bias=True),
    "softmax_bias_wmma": margin_case(33, 97, 24, margin="softmax", bias=True, mode="f32_bf16"),
    "softmax_nobias_bf16io": margin_case(20, 45, 16, margin="softmax", mode="bf16"),
    "cosface_f32": margin_case(65, 129, 33, margin="cosface"),
    "cosface_bf16io": margin_case(65, 129, 33, margin="cosface", mode="bf16"),
    "arcface_obtuse_f32": margin_case(40, 90, 20, obtuse=True),
    "arcface_obtuse_wmma": margin_case(40, 90, 20, obtuse=True, mode="f32_bf16"),
    "arcface_easy_f32": margin_case(40, 90, 20, margin="arcface_easy", obtuse=True),
    "combined_f32": margin_case(50, 100, 36, margin="combined"),
    "combined_wmma": margin_case(50, 100, 36, margin="combined", mode="f32_bf16"),
    "multiplicative_f32": margin_case(30, 70, 20, margin="multiplicative", obtuse=True),
    # sampled rows (idx), logits kept for backward: none, part, all
    "sampled_keep_part_f32": margin_case(48, 120, 40, sampled=True, C=300, keep=50),
    "sampled_keep_part_wmma": margin_case(48, 120, 40, sampled=True, C=300, keep=50, mode="f32_bf16"),
    "sampled_keep_all_bf16io": margin_case(48, 120, 40, sampled=True, C=300, keep=1000, mode="bf16"),
    "keep_all_f32": margin_case(30, 64, 32, keep=64),
    # several column tiles per column block and several backward chunks (small constants)
    "many_tiles_f32": margin_case(130, 700, 24, keep=100, small=True),
    "many_tiles_wmma": margin_case(130, 700, 24, keep=100, small=True, mode="f32_bf16"),
    "many_tiles_bf16io": margin_case(130, 700, 24, keep=0, small=True, mode="bf16", sampled=True, C=900),
    # split grad_x reduction with the production constants (K >= 512 columns, one B x D tile)
    "split_x_f32": margin_case(64, 600, 64),
    # degenerate sizes
    "k_zero_f32": margin_case(10, 0, 16),
    "all_targets_elsewhere_f32": margin_case(12, 30, 16, minus_one=1.0),
    "d_tiny_f32": margin_case(9, 11, 3),
    # the chunked path's epilogues (library GEMMs emulated by numpy), chunks of 64 columns
    "chunked_arcface": margin_case(70, 150, 40, chunked=64, keep=100),
    "chunked_arcface_obtuse_bf16": margin_case(40, 90, 20, obtuse=True, mode="f32_bf16", chunked=32),
    "chunked_softmax_bias": margin_case(33, 97, 24, margin="softmax", bias=True, chunked=40, keep=20),
    "chunked_combined_sampled": margin_case(48, 120, 40, margin="combined", sampled=True, C=300, chunked=50),
    "chunked_multiplicative_easy": margin_case(30, 70, 20, margin="multiplicative", obtuse=True, chunked=16,
                                               keep=70),
    "chunked_arcface_easy": margin_case(40, 90, 20, margin="arcface_easy", obtuse=True, chunked=64),
    "chunked_k_zero": margin_case(10, 0, 16, chunked=64),
    # per-sample margins (the adaptive losses), CurricularFace's hard negatives
    "adaface_f32": margin_case(70, 150, 40, per_sample="adaface", keep=60),
    "adaface_wmma": margin_case(70, 150, 40, per_sample="adaface", mode="f32_bf16"),
    "magface_obtuse_f32": margin_case(40, 90, 20, per_sample="magface", obtuse=True, keep=30),
    "elastic_cos_bf16io": margin_case(48, 120, 40, per_sample="elastic_cos", sampled=True, C=300, mode="bf16"),
    "curricular_f32": margin_case(65, 129, 33, per_sample="curricular", keep=70),
    "curricular_wmma": margin_case(65, 129, 33, per_sample="curricular", mode="f32_bf16"),
    "scaled_all_many_tiles_f32": margin_case(130, 700, 24, per_sample="scaled_all", keep=100, small=True),
    "chunked_adaface": margin_case(70, 150, 40, per_sample="adaface", chunked=64, keep=100),
    "chunked_curricular": margin_case(65, 129, 33, per_sample="curricular", chunked=32, keep=40),
    "chunked_scaled_all_bf16": margin_case(48, 120, 40, per_sample="scaled_all", sampled=True, C=300,
                                           mode="f32_bf16", chunked=50),
    # range loss
    "range_f32": ("range", dict(N=24, D=6, ids=5, k=2, margin=2.0, f64=False)),
    "range_f64": ("range", dict(N=24, D=6, ids=5, k=2, margin=2.0, f64=True)),
    "range_big_k_f64": ("range", dict(N=13, D=5, ids=3, k=50, margin=0.01, f64=True)),
    "range_singletons_f32": ("range", dict(N=9, D=4, ids=8, k=3, margin=5.0, f64=False)),
}
TOL = {"f32": 2e-5, "f32_bf16": 2e-5, "bf16": 1e-2}  # relative to the largest reference value
GRAD_TOL = {"f32": 5e-5, "f32_bf16": 2e-3, "bf16": 1e-2}  # bf16: da rounded to bf16 (and bf16 outputs)


def compare(got, ref, tol, name, errs, scale=0.0):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        errs.append(f"{name}: shape {got.shape} != {ref.shape}")
        return 0.0
    fin = np.isfinite(ref)
    if not np.array_equal(np.isfinite(got), fin) or not np.array_equal(got[~fin], ref[~fin]):
        errs.append(f"{name}: non-finite entries differ")
        return math.inf
    if not fin.any():
        return 0.0
    scale = max(1.0, scale, np.abs(ref[fin]).max())
    err = float(np.abs(got[fin] - ref[fin]).max()) / scale
    if err > tol:
        errs.append(f"{name}: max error {err:.3g} (relative to {scale:.3g}) > {tol:g}")
    return err


def run_margin(dev, spec, *, seed=0):
    p = per_sample(spec["per_sample"], spec["B"], seed) if spec.get("per_sample") else MARGINS[spec["margin"]]
    x, w, idx, target, bias, g_lse, g_t = margin_problem(
        seed, spec["B"], spec["K"], spec["D"], C=spec.get("C"), margin=spec["margin"],
        sampled=spec.get("sampled", False), bias=spec.get("bias", False),
        minus_one=spec.get("minus_one", 0.2), obtuse=spec.get("obtuse", False))
    mode = spec["mode"]
    if mode == "bf16":  # bf16 inputs: the reference sees the rounded tensors
        x, w = round_bf16(x), round_bf16(w)
    if spec.get("chunked"):
        got = chunked_call(dev, x, w, idx, target, bias, p, spec["keep"], mode, g_lse, g_t, spec["chunked"])
    else:
        got = margin_call(dev, x, w, idx, target, bias, p, spec["keep"], mode, g_lse, g_t)
    ref = margin_ref(x, w, idx, target, bias, p, min(spec["keep"], spec["K"]), mode != "f32")
    grads = margin_grad_ref(ref, g_lse, g_t, p, mode != "f32")
    errs: list[str] = []
    report = {}
    for k in ("lse", "target_logit", "target_score", "max_score", "inv_norm", "saved"):
        report[k] = compare(got[k], ref[k], TOL[mode] if mode != "bf16" else 2e-5, k, errs)
    for k in ("grad_x", "grad_rows", "grad_bias"):
        if grads.get(k) is not None and (k != "grad_bias" or bias is not None):
            report[k] = compare(got[k], grads[k], GRAD_TOL[mode], k, errs,
                                scale=grads["rows_scale"] if k == "grad_rows" else 0.0)
    return errs, report, got


def run_range(dev, spec, *, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, spec["ids"], spec["N"]))
    labels = rng.permutation(labels) * 7 + 3  # not 0..n-1, not sorted
    x = rng.standard_normal((spec["N"], spec["D"]))
    got = range_call(dev, x, labels, spec["k"], spec["margin"], 0.7, 1.3, spec["f64"])
    intra, inter, gi, ge = range_ref(x, labels, spec["k"], spec["margin"])
    tol = 1e-10 if spec["f64"] else 2e-5
    errs: list[str] = []
    report = {"intra": compare(got["intra"], intra, tol, "intra", errs),
              "inter": compare(got["inter"], inter, tol, "inter", errs),
              "grad_x": compare(got["grad_x"], 0.7 * gi + 1.3 * ge, 1e-6 if spec["f64"] else 5e-5, "grad_x", errs)}
    return errs, report, got


def run_case(dev, name, seed=0):
    kind, spec = CASES[name]
    return (run_margin if kind == "margin" else run_range)(dev, spec, seed=seed)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("lib")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--small-lib", default=None, help="the library built with SMALL_TILES")
    ap.add_argument("--dump", default=None, help="write every output to this .npz (determinism checks)")
    ap.add_argument("cases", nargs="*")
    a = ap.parse_intermixed_args(argv)
    devs = {False: Device(Path(a.lib), a.seed, a.threads)}
    if a.small_lib:
        devs[True] = Device(Path(a.small_lib), a.seed, a.threads)
    dump = {}
    for name in a.cases or list(CASES):
        small = CASES[name][1].get("small", False)
        import time

        t0 = time.perf_counter()
        try:
            errs, report, got = run_case(devs[small], name)
        except Exception as e:  # noqa: BLE001 - reported per case
            errs, report, got = [f"{type(e).__name__}: {e}"], {}, {}
        for k, v in got.items():
            dump[f"{name}/{k}"] = np.asarray(v)
        print(json.dumps({"case": name, "ok": not errs, "errors": errs, "max_rel_err": report,
                          "seconds": round(time.perf_counter() - t0, 3)}), flush=True)
    if a.dump:
        np.savez(a.dump, **dump)


if __name__ == "__main__":
    main()
