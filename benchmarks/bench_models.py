"""Cost of CIN and PCA-Net over their plain backbone: inference latency and training step time.

One run measures, on one GPU and under the same settings (default: ResNet-50, 448 px, bf16
autocast, batch 32, channels_last):
- the plain backbone: timm's classifier (backbone + global average pooling + fc);
- CIN and PCA-Net built by fgattn on the same timm backbone,
and prints each model's time and its ratio to the backbone's.

Inference is the eval forward (CIN: backbone + SCI + classifier; PCA-Net: backbone + bilinear
pooling + classifier). A training step is forward + backward + SGD step on a paired batch (the first
half's partners in the second half, as the models' training forward expects).

Targets on a GPU (issue 4): CIN inference at most 1.05× the backbone, PCA-Net inference 1.00×,
CIN training step at most 1.10×. (The CIN paper measured SCI at 1.38×: 17.2 vs 12.5 ms, TITAN Xp.)

Usage:
    python benchmarks/bench_models.py [--backbone resnet50] [--batch-size 32] [--img-size 448]
        [--dtype bf16] [--compile] [--backend auto] [--json out.json]

Needs CUDA; exits with an error message otherwise (no CPU figures: they say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import json
import sys

import timm
import torch
import torch.nn.functional as F
from timing import cuda_time_ms
from torch import nn

import fgattn
from fgattn import backends

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", default="resnet50", help="timm model name (default resnet50)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (even)")
    p.add_argument("--img-size", type=int, default=448)
    p.add_argument("--num-classes", type=int, default=200)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--models", default="backbone,cin,pcanet", help="comma-separated subset")
    p.add_argument("--backend", default="auto", choices=backends.BACKENDS,
                   help="fgattn.backends setting while the models are built and timed "
                        "(default auto: the dispatcher's choice per call)")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.batch_size % 2:
        p.error(f"--batch-size must be even (paired batches), got {args.batch_size}")
    return args


def build(name: str, args: argparse.Namespace) -> nn.Module:
    if name == "backbone":
        return timm.create_model(args.backbone, num_classes=args.num_classes)
    return fgattn.create_model(name, backbone=args.backbone, num_classes=args.num_classes)


def bench_model(name: str, args: argparse.Namespace) -> dict[str, float]:
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    torch.cuda.empty_cache()  # the previous model is gone with its frame
    torch.cuda.reset_peak_memory_stats()
    memory_format = torch.contiguous_format if args.no_channels_last else torch.channels_last
    torch.manual_seed(0)
    model = build(name, args).to(device, memory_format=memory_format)
    runner = torch.compile(model) if args.compile else model
    b, s = args.batch_size, args.img_size
    x = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=memory_format)
    # Paired labels: half the pairs share a class (PCA-Net wants same-class partners, CIN both).
    first = torch.randint(0, args.num_classes, (b // 2,), device=device)
    second = torch.where(torch.arange(b // 2, device=device) % 2 == 0, first, (first + 1))
    target = torch.cat([first, second % args.num_classes])

    model.eval()

    @torch.no_grad()
    def infer() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            runner(x)

    infer_ms = cuda_time_ms(infer, args.warmup, args.iters)

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            if name == "backbone":
                loss = F.cross_entropy(runner(x), target)
            else:
                loss = runner(x, target)["loss"]
        loss.backward()
        opt.step()

    train_ms = cuda_time_ms(train_step, args.warmup, args.iters)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    return dict(infer_ms=infer_ms, train_ms=train_ms, peak_gib=peak_gib)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_models.py needs a CUDA GPU: it measures GPU inference latency and training "
            "step time, and torch.cuda.is_available() is False here. No figures were produced.",
            file=sys.stderr,
        )
        return 2
    torch.backends.cudnn.benchmark = True
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if "backbone" not in names:
        names.insert(0, "backbone")  # the reference of every ratio
    with backends.use_backend(args.backend):  # the setting every fgattn op reads when it runs
        results = {name: bench_model(name, args) for name in names}
    base = results["backbone"]
    for r in results.values():
        r["infer_ratio"] = r["infer_ms"] / base["infer_ms"]
        r["train_ratio"] = r["train_ms"] / base["train_ms"]

    print(
        f"{torch.cuda.get_device_name()} | {args.backbone} {args.img_size}px batch "
        f"{args.batch_size} {args.dtype} | compile={args.compile} "
        f"channels_last={not args.no_channels_last} | fgattn backend {args.backend} | median of "
        f"{args.iters}"
    )
    print(f"{'model':<10} {'infer ms':>9} {'x bb':>6} {'train ms':>9} {'x bb':>6} {'peak GiB':>9}")
    for name, r in results.items():
        print(
            f"{name:<10} {r['infer_ms']:9.2f} {r['infer_ratio']:6.3f} "
            f"{r['train_ms']:9.2f} {r['train_ratio']:6.3f} {r['peak_gib']:9.2f}"
        )
    if args.json:
        meta = dict(vars(args), device=torch.cuda.get_device_name(), torch=torch.__version__)
        with open(args.json, "w") as f:
            json.dump(dict(config=meta, results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
