"""Benchmark fgattn's fused channel attention against what a user would write instead.

For each (B, C, L, dtype): forward and forward+backward time (CUDA events, median) and peak extra
memory of forward+backward (max_memory_allocated minus the inputs) for
  - eager:  fgattn.ops.reference (materialises the (B, C, C) matrix in fp32),
  - sdpa:   F.scaled_dot_product_attention(-x, x, x, scale=1.0) on (B, 1, C, L) (sign folded into
            the query: C is the sequence, L the head dim),
  - fused:  fgattn.functional.channel_attention(x, backend="triton"),
on self attention q = k = v = x (SCI), plus the contrastive op |W_A − η W_B| X_A, eager vs fused.
Also checks sdpa(x, x, x, scale=-1.0) against the reference on each SDPA backend (the flash path is
suspected of taking the row max before scaling) and prints the errors.

    python benchmarks/bench_channel_attention.py --out results.json
    python benchmarks/bench_channel_attention.py --quick --out quick.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import torch.nn.functional as F
from _timing import cuda_time_ms

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench_channel_attention.json", help="JSON results path")
    p.add_argument("--quick", action="store_true", help="only B=32, C=2048, L=196, fp32 and bf16")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    p.add_argument("--channels", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--length", type=int, nargs="+", default=[49, 196, 784])
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--ops", nargs="+", choices=["attention", "contrastive"],
                   default=["attention", "contrastive"])  # fmt: skip
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 (all methods)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.channels, args.length = [32], [2048], [196]
    return args


def fmt(v) -> str:
    return f"{v:9.3f}" if v is not None else f"{'oom':>9}"


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(make_inputs, forward, args) -> dict:
    """Forward time, forward+backward time and peak extra memory of fwd+bwd; 'oom' if it fails."""
    try:
        inputs = make_inputs()
        with torch.no_grad():
            fwd = cuda_time_ms(lambda: forward(*inputs), args.warmup, args.iters)
        grad = torch.randn_like(forward(*inputs))

        def fwd_bwd():
            torch.autograd.backward(forward(*inputs), grad)
            for t in inputs:
                t.grad = None

        both = cuda_time_ms(fwd_bwd, args.warmup, args.iters)
        mem = peak_extra_bytes(fwd_bwd)
        return {"fwd_ms": fwd, "fwd_bwd_ms": both, "peak_mb": mem / 2**20}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"fwd_ms": None, "fwd_bwd_ms": None, "peak_mb": None, "error": "oom"}


def sdpa_sign_check() -> list[dict]:
    """sdpa(x, x, x, scale=-1) and sdpa(-x, x, x, scale=1) vs the reference, per SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fgattn.ops import reference

    out = []
    x = torch.randn(2, 512, 196, device="cuda").relu().to(torch.bfloat16)
    ref = reference.channel_attention(x, x, x, -1.0).float()
    x4 = x.unsqueeze(1)
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        row = {"backend": name}
        for label, call in (
            ("scale=-1", lambda: F.scaled_dot_product_attention(x4, x4, x4, scale=-1.0)),
            ("-q,scale=+1", lambda: F.scaled_dot_product_attention(-x4, x4, x4, scale=1.0)),
        ):
            try:
                with sdpa_kernel(backend):
                    got = call().squeeze(1).float()
                row[label] = (got - ref).abs().max().item()
            except RuntimeError as err:  # backend not available for these inputs
                row[label] = f"unavailable: {str(err).splitlines()[0][:80]}"
        out.append(row)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_channel_attention: needs a CUDA GPU (torch.cuda.is_available() is False); "
              "nothing measured.", file=sys.stderr)  # fmt: skip
        return 2
    from fgattn import backend as fb
    from fgattn import functional as fgF
    from fgattn.ops import reference

    if not fb.is_available("triton"):
        print(
            f"bench_channel_attention: Triton backend unavailable: {fb._load_errors}",
            file=sys.stderr,
        )
        return 2
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(0)

    methods = {
        "attention": {
            "eager": lambda x: reference.channel_attention(x, x, x, -1.0),
            "sdpa": lambda x: F.scaled_dot_product_attention(
                -x.unsqueeze(1), x.unsqueeze(1), x.unsqueeze(1), scale=1.0
            ).squeeze(1),
            "fused": lambda x: fgF.channel_attention(x, backend="triton"),
        },
        "contrastive": {
            "eager": lambda a, b, e: reference.contrastive_channel_attention(a, b, e, -1.0),
            "fused": lambda a, b, e: fgF.contrastive_channel_attention(a, b, e, backend="triton"),
        },
    }
    # --- CUDA C++ backend (fgattn/csrc; issue 6): rows "cuda", ratios still vs "fused" (Triton).
    # An unbuilt extension is compiled here once, before any timing.
    if fb.is_available("cuda"):
        from fgattn.ops import cuda_backend

        cuda_backend._ensure_loaded()
        methods["attention"]["cuda"] = lambda x: fgF.channel_attention(x, backend="cuda")
        methods["contrastive"]["cuda"] = lambda a, b, e: fgF.contrastive_channel_attention(
            a, b, e, backend="cuda"
        )
    else:
        print(f"bench_channel_attention: no cuda backend: {fb._load_errors.get('cuda')}")
    # --- end CUDA C++ backend
    results = []
    header = f"{'op':12}{'dtype':6}{'B':>4}{'C':>6}{'L':>5} {'method':7}{'fwd ms':>9}{'f+b ms':>9}"
    header += f"{'peak MB':>10}{'fwd x':>7}{'f+b x':>7}{'mem x':>7}"
    print(header)
    for op in args.ops:
        for dname in args.dtype:
            dtype = DTYPES[dname]
            for b in args.batch:
                for c in args.channels:
                    for length in args.length:

                        def make(b=b, c=c, length=length, dtype=dtype, op=op):
                            x = torch.randn(b, c, length, device="cuda").relu().to(dtype)
                            if op == "attention":
                                return [x.requires_grad_()]
                            y = torch.randn(b, c, length, device="cuda").relu().to(dtype)
                            eta = torch.rand(b, device="cuda")
                            return [x.requires_grad_(), y.requires_grad_(), eta.requires_grad_()]

                        row = {"op": op, "dtype": dname, "B": b, "C": c, "L": length}
                        for method, fn in methods[op].items():
                            row[method] = measure(make, fn, args)
                        results.append(row)
                        fused = row["fused"]
                        for method in methods[op]:
                            m = row[method]
                            ratio = {}
                            for key in ("fwd_ms", "fwd_bwd_ms", "peak_mb"):
                                ok = m[key] is not None and fused[key]
                                ratio[key] = f"{m[key] / fused[key]:7.2f}" if ok else f"{'-':>7}"
                            print(
                                f"{op:12}{dname:6}{b:>4}{c:>6}{length:>5} {method:7}"
                                f"{fmt(m['fwd_ms'])}{fmt(m['fwd_bwd_ms'])}"
                                f"{(m['peak_mb'] or 0):10.1f}"
                                f"{ratio['fwd_ms']}{ratio['fwd_bwd_ms']}{ratio['peak_mb']}"
                            )
    print("(ratios: method / fused; > 1 means fused is faster or smaller)")

    check = sdpa_sign_check()
    print("\nsdpa sign check, max |sdpa - reference| (bf16, B=2, C=512, L=196, post-ReLU):")
    for row in check:
        print(
            f"  {row['backend']:20} scale=-1: {row['scale=-1']}"
            f"   -q, scale=+1: {row['-q,scale=+1']}"
        )

    meta = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "command": " ".join(sys.argv),
        "tf32": args.tf32,
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results, "sdpa_sign_check": check}, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
