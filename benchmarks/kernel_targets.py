"""Issue 11's targets, checked against `bench_channel_attention.py` JSON: one verdict per target.

Each target compares fgattn's Triton kernels (every implementation whose name starts with
"triton": triton, triton_fa, triton_gram) with what a user could call instead, on rows of the
same run, so the ratios hold on any GPU; the absolute budgets (ms) are the H100's and are
reported as "n/a" for another device. Peak memory counts as much as time: at every size in the
files, the kernel that wins forward+backward must need at most 1/5 of eager's peak.

    bash benchmarks/gpu_session.sh kernels OUT        # runs the sizes, then this script
    python benchmarks/kernel_targets.py OUT/kernels_*.json

Prints a table and exits 0; a target whose rows are missing says "not measured".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple


class Target(NamedTuple):
    """Our best kernel's `metric` at (op, dtype, L, B=32, C=2048) within `budget_ms` on an H100
    and at most `ratio` × the time of `rival` (an implementation name) in the same run."""

    name: str
    op: str
    dtype: str
    length: int
    metric: str  # "fwd" or "fwd_bwd"
    rival: str
    ratio: float
    budget_ms: float | None


TARGETS = [
    Target("self L=196 forward (cuDNN parity)", "self", "bf16", 196, "fwd", "sdpa_cudnn",
           1.0, 0.24),
    Target("self L=196 fwd+bwd (>= 1.4x cuDNN)", "self", "bf16", 196, "fwd_bwd", "sdpa_cudnn",
           1 / 1.4, 1.2),
    Target("self L=784 forward (>= 3.8x mem-efficient)", "self", "bf16", 784, "fwd",
           "sdpa_efficient", 1 / 3.8, 1.0),
    Target("self L=784 fwd+bwd (>= 10x mem-efficient)", "self", "bf16", 784, "fwd_bwd",
           "sdpa_efficient", 1 / 10, 3.5),
    Target("contrastive L=196 fwd+bwd (>= 6x eager)", "contrastive", "bf16", 196, "fwd_bwd",
           "reference", 1 / 6, 3.0),
    Target("fp32 exact self L=196 forward (<= eager)", "self", "fp32", 196, "fwd", "reference",
           1.0, None),
    Target("fp32 exact self L=196 fwd+bwd (<= eager)", "self", "fp32", 196, "fwd_bwd",
           "reference", 1.0, None),
    Target("fp32 TF32 self L=196 fwd+bwd (<= eager, TF32)", "self", "fp32+tf32", 196, "fwd_bwd",
           "reference", 1.0, None),
]  # fmt: skip
SHAPE = {"B": 32, "C": 2048}
MEMORY_SHARE = 1 / 5  # of eager's forward+backward peak


def ours(name: str) -> bool:
    return name.startswith("triton")


def _ms(row, metric):
    return None if row is None or row.get("error") else row.get(f"{metric}_ms")


def _best_of_ours(rows, metric):
    timed = [r for r in rows if ours(r["impl"]) and _ms(r, metric) is not None]
    return min(timed, key=lambda r: r[f"{metric}_ms"], default=None)


def check_target(target: Target, rows: list[dict], h100: bool) -> dict:
    """{target, ours, ms, rival_ms, ratio, verdict} for one target over rows of one size."""
    size = [
        r for r in rows
        if (r["op"], r["dtype"], r["L"], r["B"], r["C"])
        == (target.op, target.dtype, target.length, SHAPE["B"], SHAPE["C"])
    ]  # fmt: skip
    best = _best_of_ours(size, target.metric)
    rival = _ms(next((r for r in size if r["impl"] == target.rival), None), target.metric)
    result = {"target": target.name, "ours": None, "ms": None, "rival_ms": rival, "ratio": None}
    if best is None or rival is None:
        return result | {"verdict": "not measured"}
    ms = best[f"{target.metric}_ms"]
    result |= {"ours": best["impl"], "ms": ms, "ratio": ms / rival}
    ok = ms <= target.ratio * rival
    if target.budget_ms is not None and h100:
        ok = ok and ms <= target.budget_ms
    return result | {"verdict": "met" if ok else "missed"}


def check_memory(rows: list[dict]) -> list[dict]:
    """Per size with CUDA peaks: our fastest forward+backward kernel's peak over eager's."""
    out = []
    keys = sorted({(r["op"], r["dtype"], r["B"], r["C"], r["L"]) for r in rows})
    for key in keys:
        size = [r for r in rows if (r["op"], r["dtype"], r["B"], r["C"], r["L"]) == key]
        best = _best_of_ours(size, "fwd_bwd")
        eager = next((r for r in size if r["impl"] == "reference" and not r.get("error")), None)
        if best is None or eager is None or not best.get("peak_mb") or not eager.get("peak_mb"):
            continue
        share = best["peak_mb"] / eager["peak_mb"]
        verdict = "met" if share <= MEMORY_SHARE else "missed"
        out.append({"size": key, "ours": best["impl"], "share": share, "verdict": verdict})
    return out


def load_rows(paths: list[str]) -> tuple[list[dict], bool]:
    """(every row of the JSON files, fp32 rows of a --tf32 run as dtype "fp32+tf32"; whether
    every run was on an H100)."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    rows = [
        row | {"dtype": "fp32+tf32"} if run["meta"].get("tf32") and row["dtype"] == "fp32" else row
        for run in runs
        for row in run["rows"]
    ]
    return rows, all("H100" in str(run["meta"].get("device", "")) for run in runs)


def report(paths: list[str]) -> str:
    """The table the script prints: every target's verdict, then memory per size."""
    all_rows, h100 = load_rows(paths)
    lines = ["| target | ours | ms | rival ms | ratio | verdict |", "|---|---|---|---|---|---|"]
    for target in TARGETS:
        r = check_target(target, all_rows, h100)
        fmt = [f"{v:.3f}" if isinstance(v, float) else str(v or "-") for v in
               (r["ours"], r["ms"], r["rival_ms"], r["ratio"])]  # fmt: skip
        lines.append(f"| {r['target']} | {' | '.join(fmt)} | {r['verdict']} |")
    if not h100:
        lines.append("(not an H100: the ms budgets are not checked, only the ratios)")
    lines += ["", "| op, dtype, B, C, L | ours (fastest f+b) | peak / eager's | verdict |"]
    lines.append("|---|---|---|---|")
    for m in check_memory(all_rows):
        lines.append(f"| {m['size']} | {m['ours']} | {m['share']:.3f} | {m['verdict']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("results", nargs="+", help="bench_channel_attention.py --out JSON files")
    print(report(p.parse_args(argv).results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
