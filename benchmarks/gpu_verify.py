"""One GPU verification that fits a GPU loan: every path `auto` can pick, checked and timed.

    bash benchmarks/gpu_verify.sh OUT_DIR          # on a GPU machine: at most 8 minutes
    bash benchmarks/gpu_verify.sh --cpu OUT_DIR    # the same flow on tiny sizes (CI)

gpu_verify.sh runs the steps below, each in a process of its own with its own timeout, all sharing
one Triton cache (TRITON_CACHE_DIR) in OUT_DIR. Every step writes its JSON as it goes, so a step cut
short by its timeout keeps what it did, and the verdicts are written whatever ran.

  precompile  Every Triton kernel the cells launch, compiled before anything is timed, in parallel
              (`kernel_resources.py`, one process per kernel); the registers and spills the
              machine's Triton reports: OUT_DIR/precompile/*.json.
  tma         The flash-shaped forward with TMA loads only, on a small shape, against the
              reference, in a process of its own: a fault there must not take the cells with it.
              If it fails, the cells prune the TMA configs and say so: OUT_DIR/tma.json.
  cells       One process, every cell (`cells`): for each, every implementation the dispatcher can
              run and `auto`, their first call (autotuning included) and a cached call both
              checked against the reference in fp64, forward and every gradient; first-call
              seconds, forward and forward+backward medians, peak memory, the autotuner's winning
              configs: OUT_DIR/cells.json, rewritten after each implementation.
  verdicts    OUT_DIR/verify.md from the JSON: per cell which implementation wins, whether `auto`
              is within 10 % of it, whether each Triton family beats what it should replace, which
              implementations are beaten everywhere they are offered, and the targets.

With --cpu the cells are tiny, the Triton kernels run in Triton's interpreter (bf16 cells run in
fp16 there), and `precompile` compiles one kernel for sm_90; the figures mean nothing, the flow
and the files are the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_channel_attention import (
    FWD_BWD_FLOPS,
    SLACK,
    fgattn_call,
    forward_flops,
    judge,
    make_inputs,
)
from timing import cuda_peak_extra_mb, time_ms

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # of the largest value
FAMILIES = ("triton_tiled", "triton_flash", "triton_gram")


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    op: str
    dtype: str  # "bf16" / "fp32"
    batch: int
    channels: int
    length: int
    magnitude: float = 1.0  # inputs scaled: ×30 gives logits of −1e5 and more


def cells(cpu: bool) -> list[Cell]:
    """B = 32, C = 2048: self, PCA-Net's cross (v = [F1 | F2]) and contrastive at L = 196 and 784
    in bf16; self in fp32 at L = 196; a small large-logit cell. --cpu: the same cells, tiny (L = 16
    and 272, on either side of the flash kernels' 256)."""
    b, c, short, long_ = (2, 32, 16, 272) if cpu else (32, 2048, 196, 784)
    out = [
        Cell(f"{op} bf16 L={length}", op, "bf16", b, c, length)
        for length in (short, long_)
        for op in ("self", "cross", "contrastive")
    ]
    out.append(Cell(f"self fp32 L={short}", "self", "fp32", b, c, short))
    small = (2, 16, short) if cpu else (4, 256, 196)
    out.append(Cell(f"large logits self bf16 L={small[2]} x30", "self", "bf16", *small, 30.0))
    return out


def dtype_of(cell: Cell, cpu: bool) -> torch.dtype:
    # the interpreter's bf16 tl.dot is unreliable: fp16 takes the same code paths there
    return {"bf16": torch.float16 if cpu else torch.bfloat16, "fp32": torch.float32}[cell.dtype]


def write_json(path: Path, data) -> None:
    """Write whole or not at all: a timeout may kill the step at any point."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def machine() -> dict:
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": gpu or f"CPU {platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }


# ----------------------------------------------------------------------------------------------
# Step 1: precompile


def precompile_jobs(cpu: bool) -> list[list[str]]:
    """kernel_resources.py arguments, one job per (kernel, dtype, L) the cells launch."""
    if cpu:  # the flow only: one kernel's first config, for sm_90
        flow = "--arch 90 --dtype bf16 --length 16 --channels 32 --batch 2 --first-config"
        return [[*flow.split(), "--kernel", "triton_flash._fwd_kernel"]]
    from fgattn.ops.triton import flash, gram, tiled

    major, minor = torch.cuda.get_device_capability()
    arch = str(10 * major + minor)
    names = {m: [n for n in vars(m) if n.endswith("_kernel")] for m in (tiled, flash, gram)}
    jobs = []
    for dtype, length, families in (
        ("bf16", 196, (tiled, flash)),
        ("bf16", 784, (tiled, gram)),
        ("fp32", 196, (tiled,)),
    ):
        for module in families:
            family = "triton_" + module.__name__.rsplit(".", 1)[-1]
            for name in names[module]:
                jobs.append(
                    [
                        "--arch",
                        arch,
                        "--dtype",
                        dtype,
                        "--length",
                        str(length),
                        "--channels",
                        "2048",
                        "--batch",
                        "32",
                        "--kernel",
                        f"{family}.{name}",
                    ]
                )
    return jobs


def precompile(out: Path, cpu: bool, parallel: int) -> int:
    """Run the jobs `parallel` at a time; each writes OUT/precompile/NNN.json."""
    folder = out / "precompile"
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions
    script = str(ROOT / "benchmarks" / "kernel_resources.py")
    jobs = precompile_jobs(cpu)
    running, failed = [], 0
    for i, args in enumerate(jobs):
        log = open(folder / f"{i:03d}.log", "w")  # noqa: SIM115 (closed when the job ends)
        cmd = [sys.executable, script, *args, "--json", str(folder / f"{i:03d}.json")]
        running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log))
        while len(running) >= parallel or (i == len(jobs) - 1 and running):
            proc, log = running.pop(0)
            failed += proc.wait() != 0
            log.close()
    print(f"precompile: {len(jobs)} jobs, {failed} failed; records in {folder}")
    return 0


def precompile_records(out: Path) -> list[dict]:
    records = []
    for path in sorted((out / "precompile").glob("*.json")):
        records += json.loads(path.read_text())["records"]
    return records


# ----------------------------------------------------------------------------------------------
# Step 2: TMA smoke test


def tma_smoke(out: Path, cpu: bool) -> int:
    """The flash forward with TMA loads only, against the reference; OUT/tma.json."""
    from fgattn.ops import reference
    from fgattn.ops.triton import flash, tuning

    result = {"machine": machine(), "applicable": True, "ok": None, "error": None}
    write_json(out / "tma.json", result | {"error": "did not finish"})
    if cpu:
        tuning.INTERPRETER_TMA = True
    elif not tuning.tma_available():
        result |= {"applicable": False, "error": "no TMA here (sm_90+ and Triton >= 3.5)"}
        write_json(out / "tma.json", result)
        return 0
    for kernel in (
        flash._fwd_kernel,
        flash._contrastive_stats_kernel,
        flash._contrastive_fwd_kernel,
    ):
        kernel.configs = [c for c in kernel.configs if c.kwargs.get("USE_TMA", True)]
    device, dtype = ("cpu", torch.float16) if cpu else ("cuda", torch.bfloat16)
    x = torch.randn(2, 32 if cpu else 256, 49 if cpu else 196, device=device).relu().to(dtype)
    try:
        got = flash.self_attention(x, -1.0).double()
        want = reference.self_attention(x.double(), -1.0)
        err = ((got - want).abs().max() / want.abs().max()).item()
        result |= {"ok": err <= TOL[dtype], "max_error": err}
    except Exception as e:  # a hardware fault kills the process instead: tma.json says so
        result |= {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    write_json(out / "tma.json", result)
    print(f"tma: {result}")
    return 0


# ----------------------------------------------------------------------------------------------
# Step 3: the cells


def _fp64_reference(op, xs, g):
    """The reference's output and every input gradient in fp64."""
    leaves = [t.detach().double().requires_grad_() for t in xs]
    out = fgattn_call(op, "reference")(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, g.double())]


def _errors(got, want) -> list[float]:
    """Max |got − want| over max |want| per tensor (output, then each gradient)."""
    return [
        ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        for a, b in zip(got, want, strict=True)
    ]


def _winning_configs(impl: str) -> dict[str, str]:
    """The autotuner's choice for each autotuned kernel of a Triton family, as last launched."""
    if impl not in FAMILIES[1:]:
        return {}
    import importlib

    module = importlib.import_module(f"fgattn.ops.triton.{impl.removeprefix('triton_')}")
    return {
        name: str(kernel.best_config)
        for name, kernel in vars(module).items()
        if name.endswith("_kernel") and getattr(kernel, "best_config", None) is not None
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(cell: Cell, impl: str | None, xs, g, want, device: str, iters: int) -> dict:
    """First call (timed, checked), a cached call (checked), forward and forward+backward
    medians, peak memory, the autotuner's configs of `impl` (None: auto)."""
    fn = fgattn_call(cell.op, impl)
    tol = TOL[xs[0].dtype]
    row = {"impl": impl or "auto", "error": None, "fwd_ms": None, "fwd_bwd_ms": None}

    def fwd_bwd():
        out = fn(*xs)
        return [out, *torch.autograd.grad(out, xs, g)]

    try:
        _sync(device)
        start = time.perf_counter()
        first = fwd_bwd()
        _sync(device)
        row["first_call_s"] = time.perf_counter() - start
        row["first_errors"] = _errors(first, want)
        row["cached_errors"] = _errors(fwd_bwd(), want)
        row["correct"] = max(row["first_errors"] + row["cached_errors"]) <= tol
        with torch.no_grad():
            row["fwd_ms"] = time_ms(lambda: fn(*xs), 2, iters, device)
        row["fwd_bwd_ms"] = time_ms(fwd_bwd, 2, iters, device)
        row["peak_mb"] = cuda_peak_extra_mb(fwd_bwd) if device == "cuda" else None
    except Exception as e:  # oom, a refusal, a kernel that did not compile: recorded, go on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        if device == "cuda":
            torch.cuda.empty_cache()
    row["configs"] = _winning_configs(impl or "")
    return row


def run_cell(cell: Cell, cpu: bool, iters: int, write) -> dict:
    """Every candidate and auto on one cell; `write(entry)` after each implementation."""
    from fgattn.ops import benchmark, dispatch
    from fgattn.ops.call import describe

    device = "cpu" if cpu else "cuda"
    torch.manual_seed(0)
    xs = make_inputs(cell.op, cell.batch, cell.channels, cell.length, dtype_of(cell, cpu), device)
    if cell.magnitude != 1.0:
        xs = [(t.detach() * cell.magnitude).requires_grad_() if t.dim() == 3 else t for t in xs]
    g = torch.randn_like(fgattn_call(cell.op, "reference")(*[t.detach() for t in xs]))
    want = _fp64_reference(cell.op, xs, g)
    with torch.no_grad():
        fwd_call = describe(cell.op, *xs)
    grad_call = describe(cell.op, *xs)
    entry = dataclasses.asdict(cell) | {
        "device_dtype": str(dtype_of(cell, cpu)),
        "lv": xs[-1].shape[2] if cell.op == "cross" else cell.length,
        "candidates_fwd": benchmark.candidates(fwd_call),
        "candidates_fwd_bwd": benchmark.candidates(grad_call),
        "auto_fwd": dispatch.choose(fwd_call).name,
        "auto_fwd_bwd": dispatch.choose(grad_call).name,
        "rows": [],
    }
    offered = {*entry["candidates_fwd"], *entry["candidates_fwd_bwd"]}
    names = [n for n in dispatch.IMPLEMENTATIONS if n in offered]
    for name in [*names, None]:
        entry["rows"].append(measure(cell, name, xs, g, want, device, iters))
        write(entry)
    return entry


def run_cells(out: Path, cpu: bool, iters: int) -> int:
    from fgattn import backends
    from fgattn.ops.triton import tuning

    result = {"machine": machine(), "complete": False, "tma": None, "cells": []}
    tma = json.loads((out / "tma.json").read_text()) if (out / "tma.json").exists() else None
    if tma is None or (tma["applicable"] and not tma["ok"]):
        tuning.TMA_TRITON = False  # the TMA configs are pruned (tuning.tma_available)
        result["tma"] = f"TMA pruned: the smoke test {'did not run' if tma is None else 'failed'}"
    else:
        result["tma"] = "TMA configs kept" if tma["applicable"] else tma["error"]
    backends.set_backend("auto")
    backends.set_benchmark(False)

    done: list[dict] = []

    def write(entry):  # the cells done and the one under way
        result["cells"] = [*done, entry]
        write_json(out / "cells.json", result)

    for cell in cells(cpu):
        start = time.perf_counter()
        entry = run_cell(cell, cpu, iters, write)
        entry["seconds"] = time.perf_counter() - start
        write(entry)
        done.append(entry)
        print(f"cells: {cell.name}: {len(entry['rows'])} rows in {entry['seconds']:.0f} s")
    result["cells"], result["complete"] = done, True
    write_json(out / "cells.json", result)
    return 0


# ----------------------------------------------------------------------------------------------
# Step 4: the verdicts


def _ok(rows: dict, name: str, metric: str):
    row = rows.get(name)
    return None if row is None or row["error"] else row.get(f"{metric}_ms")


def _judged(entry: dict) -> dict:
    """bench_channel_attention's verdict on a cell: per metric the fastest candidate
    (``fastest_fwd``) and auto's time over its (``auto_fwd_ratio``)."""
    cands = {m: entry[f"candidates_{m}"] for m in ("fwd", "fwd_bwd")}
    picks = {m: entry[f"auto_{m}"] for m in ("fwd", "fwd_bwd")}
    return judge({}, entry["rows"], cands, picks)


def _rival(entry: dict) -> str:
    """What fgattn's kernels should beat there: cuDNN SDPA up to L = 256, mem-efficient beyond,
    eager for the contrastive op (on the CPU, where neither runs, SDPA's CPU kernel)."""
    ran = {r["impl"] for r in entry["rows"]}
    prefer = ("sdpa_cudnn",) if entry["length"] <= 256 else ("sdpa_efficient",)
    if entry["op"] == "contrastive":
        prefer = ()
    return next((n for n in (*prefer, "sdpa_flash", "reference") if n in ran), "reference")


def _ratio(a, b):
    return a / b if a is not None and b else None


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def cell_table(entry: dict) -> list[str]:
    rows = {r["impl"]: r for r in entry["rows"]}
    verdict = _judged(entry)
    fastest = {m: verdict[f"fastest_{m}"] for m in ("fwd", "fwd_bwd")}
    rival = _rival(entry)
    flops = forward_flops(
        entry["op"], entry["batch"], entry["channels"], entry["length"], entry["lv"]
    )
    lines = [
        f"### {entry['name']} (B={entry['batch']} C={entry['channels']} L={entry['length']} "
        f"Lv={entry['lv']}, {entry['device_dtype']})",
        "",
        "| impl | first call s | first / cached max err | within tol | fwd ms | f+b ms | peak MB "
        f"| fwd TF/s | f+b TF/s | fwd × fastest | f+b × fastest | f+b × {rival} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        label = f"auto = {entry['auto_fwd']} / {entry['auto_fwd_bwd']}" if name == "auto" else name
        if r["error"]:
            lines.append(f"| {label} | {r['error']} |" + " |" * 10)
            continue
        fwd, fb = r["fwd_ms"], r["fwd_bwd_ms"]
        errs = f"{max(r['first_errors']):.1e} / {max(r['cached_errors']):.1e}"
        cells_ = [
            label,
            _fmt(r["first_call_s"], 2),
            errs,
            "yes" if r["correct"] else "**NO**",
            _fmt(fwd),
            _fmt(fb),
            _fmt(r["peak_mb"], 1),
            _fmt(flops / (fwd * 1e9), 2),
            _fmt(FWD_BWD_FLOPS * flops / (fb * 1e9), 2),
            _fmt(_ratio(fwd, _ok(rows, fastest["fwd"], "fwd")), 2),
            _fmt(_ratio(fb, _ok(rows, fastest["fwd_bwd"], "fwd_bwd")), 2),
            _fmt(_ratio(fb, _ok(rows, rival, "fwd_bwd")), 2),
        ]
        lines.append("| " + " | ".join(cells_) + " |")
    return lines


def cell_verdict(entry: dict) -> list[str]:
    rows = {r["impl"]: r for r in entry["rows"]}
    verdict, lines = _judged(entry), []
    for metric, label in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
        best, ratio = verdict[f"fastest_{metric}"], verdict[f"auto_{metric}_ratio"]
        within = "not judged" if ratio is None else ("yes" if ratio <= SLACK else "**NO**")
        lines.append(
            f"- {label}: fastest {best}; auto ({entry[f'auto_{metric}']}) "
            f"{_fmt(ratio, 2)}× of it: within 10 %: {within}"
        )
    replaces = {
        "triton_flash": ("triton_tiled", "reference"),
        "triton_gram": ("triton_tiled", "reference", "sdpa_efficient"),
        "triton_tiled": ("reference", "sdpa_efficient"),
    }
    for family, others in replaces.items():
        ours = _ok(rows, family, "fwd_bwd")
        if ours is None:
            continue
        vs = [f"{o} {_fmt(_ratio(_ok(rows, o, 'fwd_bwd'), ours), 2)}×" for o in others if o in rows]
        lines.append(f"- {family} forward+backward speedup over " + ", ".join(vs))
    for name, r in rows.items():
        for kernel, config in sorted(r.get("configs", {}).items()):
            lines.append(f"- {name} autotuned {kernel}: {config}")
    wrong = [n for n, r in rows.items() if not r["error"] and not r["correct"]]
    if wrong:
        tol = TOL[getattr(torch, entry["device_dtype"].removeprefix("torch."))]
        lines.append(
            f"- **outside {tol:g} of the largest value of the fp64 reference (first or cached "
            f"call, output or a gradient): {', '.join(wrong)}**"
        )
    return lines


def beaten_everywhere(entries: list[dict]) -> dict[str, bool]:
    """Per implementation: in every cell where it ran, another candidate was faster both
    forward and forward+backward."""
    beaten: dict[str, bool] = {}
    for entry in entries:
        rows = {r["impl"]: r for r in entry["rows"] if r["impl"] != "auto"}
        for name in rows:
            slower = all(
                _ok(rows, name, m) is not None
                and any(
                    _ok(rows, o, m) is not None and _ok(rows, o, m) < _ok(rows, name, m)
                    for o in rows
                    if o != name
                )
                for m in ("fwd", "fwd_bwd")
            )
            beaten[name] = beaten.get(name, True) and slower
    return beaten


def _cell(entries, op, dtype, length=None, magnitude=1.0):
    return next(
        (
            e
            for e in entries
            if e["op"] == op
            and e["dtype"] == dtype
            and e["magnitude"] == magnitude
            and (length is None or e["length"] == length)
        ),
        None,
    )


def _peak(rows: dict, name: str | None):
    return (rows.get(name) or {}).get("peak_mb")


def _at_most(value, bound):
    return None if value is None else value <= bound


def _best_triton(entry: dict, metric: str):
    rows = {r["impl"]: r for r in entry["rows"]}
    timed = {n: _ok(rows, n, metric) for n in FAMILIES if _ok(rows, n, metric) is not None}
    best = min(timed, key=timed.get) if timed else None
    return best, timed.get(best), rows


def targets(entries: list[dict], cpu: bool) -> list[str]:
    """The issue's targets: each met, missed or not measured, with its figures."""
    short, long_ = (16, 272) if cpu else (196, 784)
    out = ["| target | figures | verdict |", "|---|---|---|"]

    def add(name, figures, ok):
        verdict = "not measured" if ok is None else "met" if ok else "missed"
        out.append(f"| {name} | {figures} | {verdict} |")

    e = _cell(entries, "self", "bf16", short)
    for metric in ("fwd", "fwd_bwd"):
        if e is None:
            add(f"self bf16 L={short}: auto within 10 % ({metric})", "-", None)
            continue
        ratio = _judged(e)[f"auto_{metric}_ratio"]
        add(
            f"self bf16 L={short}: auto within 10 % of the fastest ({metric})",
            f"{_fmt(ratio, 2)}×",
            None if ratio is None else ratio <= SLACK,
        )
    e = _cell(entries, "self", "bf16", long_)
    for metric, factor in (("fwd_bwd", 10.0), ("fwd", 3.8)):
        best, ms, rows = _best_triton(e, metric) if e else (None, None, {})
        rival = _ok(rows, "sdpa_efficient", metric)
        speedup = _ratio(rival, ms)
        add(
            f"self bf16 L={long_}: fgattn's fastest {metric} >= {factor}x mem-efficient SDPA",
            f"{best} {_fmt(ms)} ms vs {_fmt(rival)} ms: {_fmt(speedup, 2)}×",
            None if speedup is None else speedup >= factor,
        )
    if e:
        best, _, rows = _best_triton(e, "fwd_bwd")
        share = _ratio(_peak(rows, best), _peak(rows, "reference"))
        figures = f"{best} {_fmt(share, 3)} of eager's"
        add(f"self bf16 L={long_}: its peak <= 1/5 of eager's", figures, _at_most(share, 0.2))
    e = _cell(entries, "contrastive", "bf16", short)
    best, ms, rows = _best_triton(e, "fwd_bwd") if e else (None, None, {})
    speedup = _ratio(_ok(rows, "reference", "fwd_bwd"), ms)
    add(
        f"contrastive bf16 L={short}: fgattn's fastest fwd+bwd >= 6x eager",
        f"{best} {_fmt(speedup, 2)}×",
        None if speedup is None else speedup >= 6,
    )
    e = _cell(entries, "self", "fp32", short)
    rows = {r["impl"]: r for r in e["rows"]} if e else {}
    time_share = _ratio(_ok(rows, "auto", "fwd_bwd"), _ok(rows, "reference", "fwd_bwd"))
    mem = _ratio(
        (rows.get("auto") or {}).get("peak_mb"), (rows.get("reference") or {}).get("peak_mb")
    )
    met = None if time_share is None else time_share <= 1.3 and (mem is None or mem <= 0.2)
    add(
        f"fp32 self L={short}: auto fwd+bwd <= 1.3x eager's time, <= 1/5 of its memory",
        f"{_fmt(time_share, 2)}× the time, {_fmt(mem, 3)} of the memory",
        met,
    )
    first = {}
    for entry in entries:
        for r in entry["rows"]:
            if not r["error"] and r["impl"] != "auto":
                key = (entry["op"], r["impl"])
                first[key] = max(first.get(key, 0.0), r["first_call_s"])
    worst = max(first.items(), key=lambda kv: kv[1], default=((None, None), None))
    add(
        "first call of a new shape (autotuning included) <= 30 s per op",
        f"slowest: {worst[0][1]} on {worst[0][0]}, {_fmt(worst[1], 1)} s",
        None if worst[1] is None else worst[1] <= 30,
    )
    return out


def precompile_summary(records: list[dict]) -> list[str]:
    if not records:
        return ["No precompile records (the step did not run or was cut before writing)."]
    spilled = [r for r in records if r["local_bytes"] or r["stack_bytes"]]
    over = [r for r in records if not r["smem_ok"]]
    lines = [
        f"{len(records)} kernels compiled; {len(spilled)} spill registers; "
        f"{len(over)} over the shared-memory limit."
    ]
    for r in spilled[:20]:
        where = f"{r['kernel']} {r['dtype']} L={r['L']} {r['blocks']} {r['num_warps']} warps"
        lines.append(f"- spills: {where}: {r['local_bytes']} + {r['stack_bytes']} B")
    return lines


def _tma_text(tma: dict | None) -> str:
    if tma is None:
        return "did not run"
    if not tma["applicable"] or tma["error"]:
        return str(tma["error"])
    return f"{'passed' if tma['ok'] else '**FAILED**'} (max error {tma.get('max_error'):.1e})"


def write_verdicts(out: Path, cpu: bool) -> int:
    path = out / "cells.json"
    result = json.loads(path.read_text()) if path.exists() else {"cells": [], "complete": False}
    entries, m = result["cells"], result.get("machine", {})
    tma = json.loads((out / "tma.json").read_text()) if (out / "tma.json").exists() else None
    cut = "all ran." if result.get("complete") else f"**cut short**: {len(entries)} started."
    lines = [
        "# GPU verification" + (" (CPU dry run: the figures mean nothing)" if cpu else ""),
        "",
        f"{m.get('device')}, torch {m.get('torch')}, CUDA {m.get('cuda')}, Triton "
        f"{m.get('triton')}, Python {m.get('python')}, {m.get('date')}.",
        f"Command: `bash benchmarks/gpu_verify.sh{' --cpu' if cpu else ''} OUT_DIR`.",
        f"TMA smoke test: {_tma_text(tma)}; {result.get('tma')}.",
        "Cells: " + cut,
        "",
        "## Targets",
        "",
        *targets(entries, cpu),
        "",
        "## Implementations beaten everywhere they ran (candidates to retire)",
        "",
    ]
    for name, beaten in beaten_everywhere(entries).items():
        lines.append(
            f"- {name}: {'beaten in every cell it ran' if beaten else 'fastest somewhere'}"
        )
    lines += ["", "## Cells", ""]
    for entry in entries:
        lines += [*cell_table(entry), "", *cell_verdict(entry), ""]
    lines += ["## Precompiled kernels", "", *precompile_summary(precompile_records(out)), ""]
    (out / "verify.md").write_text("\n".join(lines))
    print("\n".join(lines[:30]))
    return 0


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("step", choices=["precompile", "tma", "cells", "verdicts"])
    p.add_argument("out", type=Path)
    p.add_argument("--cpu", action="store_true", help="tiny cells, Triton's interpreter")
    p.add_argument("--parallel", type=int, default=os.cpu_count() or 1, help="precompile jobs")
    p.add_argument("--iters", type=int, default=10, help="timed calls per median")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "precompile":
        return precompile(args.out, args.cpu, args.parallel)
    if args.step == "tma":
        return tma_smoke(args.out, args.cpu)
    if args.step == "cells":
        return run_cells(args.out, args.cpu, 2 if args.cpu else args.iters)
    return write_verdicts(args.out, args.cpu)


if __name__ == "__main__":
    sys.exit(main())
