"""Time every channel-attention implementation fgattn's dispatcher can pick, and what `auto` picks.

For each op and size (B, C, L, dtype), one run times on the same inputs:
  - every candidate: each implementation `fgattn.ops.benchmark.candidates` says can run the call
    here (of reference, sdpa_cudnn, sdpa_flash, sdpa_efficient, triton_tiled, triton_flash
    (L <= 256), triton_gram (L > 256)), called through `fgattn.functional` with backend=NAME;
  - auto: backend=None, the dispatcher's own choice, with the implementation it picked (the
    forward, under no_grad, and the forward+backward are different calls and may pick differently);
  - extras that a user could call instead but the dispatcher never picks (not candidates):
      compiled_reference     torch.compile(fgattn.ops.reference.cross_attention); self and cross
      flex                   compiled FlexAttention, score_mod = -score, on (B, 1, C, L); CUDA,
                             self and cross with Lv == L (so not PCA-Net's cross, whose Lv is 2L)
      sdpa_unpadded_default  F.scaled_dot_product_attention(-q, k, v, scale=1.0) on (B, 1, C, L),
                             L not padded, PyTorch's default kernel pick; CUDA
The ops, all with the papers' scale -1: self (SCI; x = randn(B, C, L).relu()), cross in PCA-Net's
shape (q = F1, k = F2 post-ReLU, v = [F1 | F2] of width Lv = 2L, a leaf of its own), contrastive
(|W_A - eta W_B| X_A; x_a, x_b post-ReLU, eta = rand(B)).

Per row: forward ms (under no_grad) and forward+backward ms (gradients of every input), each the
median of --iters calls after --warmup (CUDA events on a GPU, time.perf_counter on CPU); the peak
memory of forward+backward above what was held before it (CUDA only); TFLOP/s; and the time over
the fastest candidate's. FLOPs of the forward: 2·B·C²·L (logits) + 2·B·C²·Lv (product with v), for
the contrastive op 2·2·B·C²·L (two logit GEMMs) + 2·B·C²·L; of forward+backward 3.5x the forward's
(FlashAttention's convention: the backward does 2.5x the forward's matmuls). A row that fails
records "oom" or "error: <first line>" and the run goes on.

Each size ends with whether auto is within 10 % of the fastest candidate, forward and
forward+backward each (extras do not count); the run ends with the count over all sizes. On CUDA it
also checks SDPA's sign handling: sdpa(x, x, x, scale=-1) per SDPA kernel against the reference,
next to the sign-folded sdpa(-x, x, x, scale=1) that fgattn runs. --out writes the device, date,
versions, command line, every row and every size's verdict as JSON, rewritten after each size.

    python benchmarks/bench_channel_attention.py --out grid.json        # B=32, C 512-2048, L 49-784
    python benchmarks/bench_channel_attention.py --quick --out quick.json    # B=32 C=2048 L=196
    python benchmarks/bench_channel_attention.py --ops self --dtype bf16 --channels 512 2048
    python benchmarks/bench_channel_attention.py --device cpu --batch 2 --channels 64 --length 49
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import cuda_peak_extra_mb, time_ms

from fgattn import backends
from fgattn.functional import channel_attention, contrastive_channel_attention
from fgattn.ops import benchmark, dispatch, reference
from fgattn.ops.call import describe
from fgattn.ops.registry import IMPLEMENTATIONS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("self", "cross", "contrastive")
EXTRAS = ("compiled_reference", "flex", "sdpa_unpadded_default")
METRICS = {"fwd": "fwd", "fwd_bwd": "f+b"}
SLACK = 1.10  # auto is flagged where it takes longer than this times the fastest candidate
FWD_BWD_FLOPS = 3.5  # forward+backward FLOPs per forward FLOP (FlashAttention's convention)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="default: all")
    p.add_argument("--batch", type=int, nargs="+", default=[32], help="B (default 32)")
    p.add_argument("--channels", type=int, nargs="+", default=[512, 1024, 2048],
                   help="C (default 512 1024 2048)")  # fmt: skip
    p.add_argument("--length", type=int, nargs="+", default=[49, 196, 784],
                   help="L = H·W (default 49 196 784)")  # fmt: skip
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"],
                   help="default: bf16 fp32")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="only B=32, C=2048, L=196")
    p.add_argument("--extras", nargs="+", choices=[*EXTRAS, "none"], default=list(EXTRAS),
                   help="extra rows (default all; 'none': candidates and auto only)")  # fmt: skip
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="default: cuda")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (>= 1)")
    p.add_argument("--iters", type=int, default=20, help="timed calls; the median is reported")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 matmuls (all rows)")
    p.add_argument("--out", help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.channels, args.length = [32], [2048], [196]
    if args.warmup < 1 or args.iters < 1:
        p.error("--warmup and --iters must be >= 1 (the first call compiles)")
    args.extras = [name for name in args.extras if name != "none"]
    return args


# ----------------------------------------------------------------------------------------------
# What is timed: functions of the op's input tensors


def make_inputs(op: str, b: int, c: int, length: int, dtype, device: str) -> list[torch.Tensor]:
    """Post-ReLU features (what SCI and PCA-Net see) as leaves that need grad."""

    def feature() -> torch.Tensor:
        return torch.randn(b, c, length, device=device).relu().to(dtype)

    if op == "self":
        xs = [feature()]
    elif op == "cross":  # PCA-Net: q = F1, k = F2, v = [F1 | F2]
        f1, f2 = feature(), feature()
        xs = [f1, f2, torch.cat([f1, f2], dim=2)]
    else:
        xs = [feature(), feature(), torch.rand(b, device=device)]
    return [x.requires_grad_() for x in xs]


def fgattn_call(op: str, backend: str | None) -> Callable[..., torch.Tensor]:
    """fgattn.functional's op run by `backend` (None: auto)."""
    if op == "contrastive":
        return lambda a, b, eta: contrastive_channel_attention(a, b, eta, backend=backend)
    if op == "self":
        return lambda x: channel_attention(x, backend=backend)
    return lambda q, k, v: channel_attention(q, k, v, backend=backend)


def _heads(xs) -> list[torch.Tensor]:
    """q, k, v as SDPA's (B, 1, C, L): one head, the channels as the sequence."""
    return [t.unsqueeze(1) for t in (xs * 3 if len(xs) == 1 else xs)]


def compiled_reference() -> Callable[..., torch.Tensor]:
    compiled = torch.compile(reference.cross_attention, dynamic=False)
    return lambda *xs: compiled(*(xs * 3 if len(xs) == 1 else xs), -1.0)


def sdpa_unpadded_default() -> Callable[..., torch.Tensor]:
    def call(*xs):
        q, k, v = _heads(xs)
        return F.scaled_dot_product_attention(-q, k, v, scale=1.0).squeeze(1)

    return call


def _negate(score, batch, head, q_idx, kv_idx):
    return -score


def flex() -> Callable[..., torch.Tensor]:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as err:
        raise RuntimeError(f"no FlexAttention in this torch: {err}") from err
    compiled = torch.compile(flex_attention, dynamic=False)

    def call(*xs):
        q, k, v = _heads(xs)
        return compiled(q, k, v, score_mod=_negate, scale=1.0).squeeze(1)

    return call


EXTRA_BUILDERS = {
    "compiled_reference": compiled_reference,
    "flex": flex,
    "sdpa_unpadded_default": sdpa_unpadded_default,
}


def extras_for(op: str, xs, device: str, names) -> tuple[dict[str, Callable], dict[str, str]]:
    """The extras that apply to this op and device (their builders), and why the others do not."""
    builders, skipped = {}, {}
    for name in names:
        if op == "contrastive":
            skipped[name] = "self and cross only"
        elif name != "compiled_reference" and device != "cuda":
            skipped[name] = "CUDA only"
        elif name == "flex" and xs[-1].shape[2] != xs[0].shape[2]:
            skipped[name] = "needs Lv == L"
        else:
            builders[name] = EXTRA_BUILDERS[name]
    return builders, skipped


# ----------------------------------------------------------------------------------------------
# Measuring


def _failures() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [RuntimeError, ValueError]  # OOM is a RuntimeError
    try:  # Triton's compile and shared-memory errors are plain Exceptions
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources

        errors += [CompilationError, OutOfResources]
    except ImportError:
        pass
    return tuple(errors)


FAILURES = _failures()


def failure(err: BaseException) -> str:
    if isinstance(err, torch.OutOfMemoryError):
        return "oom"
    lines = str(err).strip().splitlines()
    return f"error: {lines[0][:200] if lines else type(err).__name__}"


def measure(build: Callable[[], Callable], xs: list[torch.Tensor], args) -> dict:
    """Forward ms (no_grad), forward+backward ms and its peak extra MB of `build()` on xs."""
    row = {"fwd_ms": None, "fwd_bwd_ms": None, "peak_mb": None, "error": None, "failed_in": None}
    phase = "fwd"
    try:
        fn = build()
        with torch.no_grad():
            row["fwd_ms"] = time_ms(lambda: fn(*xs), args.warmup, args.iters, args.device)
            grad_out = torch.randn_like(fn(*xs))
        phase = "fwd_bwd"

        def fwd_bwd():
            return torch.autograd.grad(fn(*xs), xs, grad_out)

        row["fwd_bwd_ms"] = time_ms(fwd_bwd, args.warmup, args.iters, args.device)
        if args.device == "cuda":
            row["peak_mb"] = cuda_peak_extra_mb(fwd_bwd)
    except FAILURES as err:
        row["error"], row["failed_in"] = failure(err), phase
    if row["error"] and args.device == "cuda":
        torch.cuda.empty_cache()  # what the failed call held
    return row


def dispatcher_view(op: str, xs) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Per metric, the dispatcher's candidates and auto's choice for these inputs."""
    with torch.no_grad():
        call = describe(op, *xs)
        cands, picks = {"fwd": benchmark.candidates(call)}, {"fwd": dispatch.choose(call).name}
    call = describe(op, *xs)  # xs need grad: a backward follows
    cands["fwd_bwd"], picks["fwd_bwd"] = benchmark.candidates(call), dispatch.choose(call).name
    return cands, picks


def bench_size(op: str, dname: str, b: int, c: int, length: int, args) -> tuple[list, dict]:
    """Every row of one size, and the size's verdict."""
    torch.manual_seed(0)
    torch.compiler.reset()  # each size compiles its extras afresh (static shapes, no recompile cap)
    xs = make_inputs(op, b, c, length, DTYPES[dname], args.device)
    lv = length if op == "contrastive" else xs[-1].shape[2]
    key = {"op": op, "dtype": dname, "B": b, "C": c, "L": length, "Lv": lv}
    cands, picks = dispatcher_view(op, xs)
    names = [n for n in IMPLEMENTATIONS if n in cands["fwd"] + cands["fwd_bwd"]]
    builders, skipped = extras_for(op, xs, args.device, args.extras)
    rows = []
    for name in names:
        built = functools.partial(fgattn_call, op, name)
        rows.append({**key, "impl": name, "kind": "candidate", **measure(built, xs, args)})
    auto = {"auto_fwd": picks["fwd"], "auto_fwd_bwd": picks["fwd_bwd"]}
    auto_row = measure(functools.partial(fgattn_call, op, None), xs, args)
    rows.append({**key, "impl": "auto", "kind": "auto", **auto, **auto_row})
    for name, build in builders.items():
        rows.append({**key, "impl": name, "kind": "extra", **measure(build, xs, args)})
    verdict = judge(key, rows, cands, picks)
    add_rates(rows, forward_flops(op, b, c, length, lv), verdict)
    verdict["skipped_extras"] = skipped
    return rows, verdict


def forward_flops(op: str, b: int, c: int, length: int, lv: int) -> float:
    if op == "contrastive":
        return 2 * 2 * b * c * c * length + 2 * b * c * c * length
    return 2 * b * c * c * length + 2 * b * c * c * lv


def judge(key: dict, rows: list[dict], cands: dict, picks: dict) -> dict:
    """Per metric: the candidates, the fastest, auto's pick and auto's time over the fastest's.
    within_10pct is None where no candidate ran, False where auto failed."""
    by_name = {row["impl"]: row for row in rows}
    verdict, within = dict(key), []
    for m in METRICS:
        timed = {n: by_name[n][f"{m}_ms"] for n in cands[m] if by_name[n][f"{m}_ms"] is not None}
        fastest = min(timed, key=timed.get) if timed else None
        auto_ms = by_name["auto"][f"{m}_ms"]
        ratio = auto_ms / timed[fastest] if fastest and auto_ms is not None else None
        verdict.update({f"candidates_{m}": cands[m], f"auto_{m}": picks[m]})
        verdict.update({f"fastest_{m}": fastest, f"auto_{m}_ratio": ratio})
        if fastest is not None:
            within.append(ratio is not None and ratio <= SLACK)
    verdict["within_10pct"] = all(within) if within else None
    return verdict


def add_rates(rows: list[dict], fwd_flops: float, verdict: dict) -> None:
    """TFLOP/s of each row and its time over the fastest candidate's, per metric."""
    flops = {"fwd": fwd_flops, "fwd_bwd": FWD_BWD_FLOPS * fwd_flops}
    for row in rows:
        for m in METRICS:
            ms, fastest = row[f"{m}_ms"], verdict[f"fastest_{m}"]
            best = next((r[f"{m}_ms"] for r in rows if r["impl"] == fastest), None)
            row[f"{m}_tflops"] = flops[m] / (ms * 1e9) if ms else None
            row[f"{m}_ratio"] = ms / best if ms and best else None


# ----------------------------------------------------------------------------------------------
# Reporting

HEADER = (
    f"  {'impl':30}{'fwd ms':>9}{'f+b ms':>9}{'peak MB':>9}{'fwd TF/s':>9}{'f+b TF/s':>9}"
    f"{'fwd x':>7}{'f+b x':>7}"
)


def _cell(value, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def size_label(v: dict) -> str:
    return f"{v['op']} {v['dtype']} B={v['B']} C={v['C']} L={v['L']} Lv={v['Lv']}"


def row_line(row: dict) -> str:
    label = row["impl"]
    if row["kind"] == "auto":
        picks = {row["auto_fwd"], row["auto_fwd_bwd"]}
        label = "auto = " + (row["auto_fwd"] if len(picks) == 1 else " / ".join(
            (row["auto_fwd"], row["auto_fwd_bwd"])))  # fmt: skip
    line = f"  {label:30}{_cell(row['fwd_ms'], 9, 3)}{_cell(row['fwd_bwd_ms'], 9, 3)}"
    line += f"{_cell(row['peak_mb'], 9, 1)}{_cell(row['fwd_tflops'], 9, 2)}"
    line += f"{_cell(row['fwd_bwd_tflops'], 9, 2)}{_cell(row['fwd_ratio'], 7, 2)}"
    line += _cell(row["fwd_bwd_ratio"], 7, 2)
    return line + (f"  {row['error']} ({row['failed_in']})" if row["error"] else "")


def verdict_text(v: dict) -> str:
    """'fwd 1.02x, f+b 1.35x (auto sdpa_flash, fastest reference)': auto over the fastest."""
    parts = []
    for m, short in METRICS.items():
        if v[f"fastest_{m}"] is None:
            parts.append(f"{short}: no candidate ran")
            continue
        ratio = v[f"auto_{m}_ratio"]
        text = f"{short} {ratio:.2f}x" if ratio is not None else f"{short} auto failed"
        if v[f"auto_{m}"] != v[f"fastest_{m}"]:
            text += f" (auto {v[f'auto_{m}']}, fastest {v[f'fastest_{m}']})"
        parts.append(text)
    return ", ".join(parts)


def print_size(rows: list[dict], verdict: dict) -> None:
    print(f"\n{size_label(verdict)}   (x: time over the fastest candidate's)")
    print(HEADER)
    for row in (r for r in rows if r["kind"] != "extra"):
        print(row_line(row))
    extras = [r for r in rows if r["kind"] == "extra"]
    if extras or verdict["skipped_extras"]:
        print("  -- not picked by the dispatcher; a user could call instead:")
    for row in extras:
        print(row_line(row))
    for name, why in verdict["skipped_extras"].items():
        print(f"  {name:30}not run: {why}")
    ok = {True: "yes", False: "NO", None: "not judged"}[verdict["within_10pct"]]
    print(f"  auto within 10 % of the fastest candidate: {ok}: {verdict_text(verdict)}")


def summary(verdicts: list[dict]) -> str:
    judged = [v for v in verdicts if v["within_10pct"] is not None]
    slow = [v for v in judged if not v["within_10pct"]]
    where = "".join(f"\n  {size_label(v)}: {verdict_text(v)}" for v in slow) or " none"
    return (
        f"auto within 10 % of the fastest candidate: {len(judged) - len(slow)} of {len(judged)} "
        f"sizes; slower at:{where}"
    )


def sdpa_sign_check() -> list[dict]:
    """sdpa(x, x, x, scale=-1) and sdpa(-x, x, x, scale=1) vs the reference, per SDPA kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = []
    x = torch.randn(2, 512, 196, device="cuda").relu().to(torch.bfloat16)
    ref = reference.self_attention(x, -1.0).float()
    x4 = x.unsqueeze(1)
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        kernel = getattr(SDPBackend, name, None)
        row = {"backend": name}
        for label, call in (
            ("scale=-1", lambda: F.scaled_dot_product_attention(x4, x4, x4, scale=-1.0)),
            ("-q,scale=+1", lambda: F.scaled_dot_product_attention(-x4, x4, x4, scale=1.0)),
        ):
            try:
                with sdpa_kernel(kernel):
                    got = call().squeeze(1).float()
                row[label] = (got - ref).abs().max().item()
            except RuntimeError as err:  # kernel not available for these inputs
                row[label] = f"unavailable: {str(err).splitlines()[0][:80]}"
        out.append(row)
    print("\nsdpa sign check, max |sdpa - reference| (bf16, B=2, C=512, L=196, post-ReLU):")
    for row in out:
        neg, folded = row["scale=-1"], row["-q,scale=+1"]
        print(f"  {row['backend']:20} scale=-1: {neg}   -q, scale=+1: {folded}")
    return out


def run_meta(args, argv: list[str]) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if args.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "command": shlex.join(["python", sys.argv[0], *argv]),
        "tf32": args.tf32,
        "benchmark_mode": backends.get_benchmark(),  # $FGATTN_BENCHMARK: auto times candidates
        "warmup": args.warmup,
        "iters": args.iters,
    }


def write(path: str | None, result: dict) -> None:
    """Write the JSON whole or not at all (a timeout may kill the run at any point)."""
    if path:
        with open(f"{path}.tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(f"{path}.tmp", path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench_channel_attention: --device cuda needs a CUDA GPU (torch.cuda.is_available() "
            "is False); nothing measured. Use --device cpu for CPU figures.",
            file=sys.stderr,
        )
        return 2
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    result = {"meta": run_meta(args, argv), "complete": False, "rows": [], "sizes": []}
    sizes = itertools.product(args.ops, args.dtype, args.batch, args.channels, args.length)
    with backends.use_backend("auto"):  # auto whatever $FGATTN_BACKEND says
        for size in sizes:
            rows, verdict = bench_size(*size, args)
            print_size(rows, verdict)
            result["rows"] += rows
            result["sizes"].append(verdict)
            write(args.out, result)  # a run cut short by a timeout keeps what it measured
    print("\n" + summary(result["sizes"]))
    if args.device == "cuda":
        result["sdpa_sign_check"] = sdpa_sign_check()
    result["complete"] = True
    write(args.out, result)
    if args.out:
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
