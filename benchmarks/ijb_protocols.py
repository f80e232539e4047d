"""IJB-style protocols on the demo network (issue 23), measured through the CLI:

* a synthetic IJB set (`dpface convert synthetic-ijb`: 100 held-out identities, 3 templates
  each of 1-3 media of 1-3 faces, mixed quality, loose crops with noisy landmarks);
* its 1:N protocol (`--protocol ijb-1n`: two galleries of 50 subjects, the 200 other templates
  as mixed probes): CMC and TPIR@FPIR per gallery;
* its 1:1 protocol (`--protocol ijb`) read both ways (`--tar-convention strict | nearest`):
  how far insightface's nearest-ROC-point reading moves TAR@FAR at each FAR, and where it
  reports a value the strict reading cannot (fewer than 1/FAR impostor pairs).

    python benchmarks/ijb_protocols.py --checkpoint runs/cpu_demo --out runs/ijb_protocols
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dpface(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "dpface", *args], check=True, cwd=REPO, capture_output=True, text=True)
    return json.loads(res.stdout[res.stdout.index("{"):]) if "{" in res.stdout else {}


def fmt(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="a run or checkpoint (the demo's)")
    ap.add_argument("--out", type=Path, default=Path("runs/ijb_protocols"))
    ap.add_argument("--identities", type=int, default=100)
    args = ap.parse_args()
    t0 = time.time()
    out = args.out.resolve()
    ijb = out / "ijb-synth"
    if not (ijb / "meta").is_dir():
        subprocess.run([sys.executable, "-m", "dpface", "convert", "synthetic-ijb", str(ijb), "--identities",
                        str(args.identities), "--templates", "3"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    ck = str(args.checkpoint.resolve())
    one_n = dpface("eval", "--checkpoint", ck, "--protocol", "ijb-1n", "--ijb-dir", str(ijb))
    strict = dpface("eval", "--checkpoint", ck, "--protocol", "ijb", "--ijb-dir", str(ijb))
    nearest = dpface("eval", "--checkpoint", ck, "--protocol", "ijb", "--ijb-dir", str(ijb),
                     "--tar-convention", "nearest")
    lines = ["### IJB 1:N (synthetic)", "",
             "| gallery | templates | mated / non-mated probes | rank-1 | rank-5 | rank-10 | TPIR@FPIR 1e-2 | "
             "TPIR@FPIR 1e-1 |", "|---|---|---|---|---|---|---|---|"]
    for g in ("G1", "G2", "mean"):
        k = f"ijb-1n/synth/{g}"
        counts = "–" if g == "mean" else f"{one_n[k + '/mated']} / {one_n[k + '/non_mated']}"
        size = "–" if g == "mean" else str(one_n[k + "/gallery"])
        lines.append(f"| {g} | {size} | {counts} | " + " | ".join(
            fmt(one_n[f"{k}/{m}"]) for m in ("rank1", "rank5", "rank10", "tpir@fpir=0.01", "tpir@fpir=0.1")) + " |")
    lines += ["", "### TAR@FAR strict vs nearest (synthetic IJB 1:1, flip+norm+det)", "",
              "| FAR | strict | nearest | nearest − strict |", "|---|---|---|---|"]
    for far in ("1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"):
        s, n = strict[f"ijb/synth/tar@far={far}"], nearest[f"ijb/synth/nearest_tar@far={far}"]
        diff = "–" if s is None or n is None else f"{100 * (n - s):+.2f}"
        lines.append(f"| {far} | {fmt(s)} | {fmt(n)} | {diff} |")
    text = "\n".join(lines) + f"\n\n({round(time.time() - t0)} s)\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"1:N": one_n, "strict": strict, "nearest": nearest}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
