"""Evaluate a checkpoint of examples/train_*.py: top-1 / top-5 on the test split.

    python examples/evaluate.py runs/<run>/best.pth
    python examples/evaluate.py runs/<run>/best.pth --flip   # + mirror image, logits averaged
    python examples/evaluate.py runs/<run>/last.pth --ema --data-root /data/cub
    torchrun --nproc_per_node 4 examples/evaluate.py runs/<run>/best.pth   # exact, sharded

The model, dataset and transforms come from the config stored in the checkpoint; ``--dataset``,
``--data-root``, ``--image-size`` and ``--resize`` override it (e.g. to evaluate elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist
from timm.utils.distributed import init_distributed_device_so

from fgattn.train import (
    TrainConfig,
    build_dataset,
    build_eval_loader,
    build_model,
    evaluate,
    load_checkpoint,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint", help="last.pth or best.pth of a training run")
    p.add_argument("--flip", action="store_true", help="average logits with the mirrored image")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    p.add_argument("--dataset", help="override the checkpoint's dataset")
    p.add_argument("--data-root", help="override the checkpoint's data root")
    p.add_argument("--image-size", type=int, help="override the crop size")
    p.add_argument("--resize", type=int, help="override the resize before the centre crop")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size")
    p.add_argument("--workers", type=int, default=None, help="dataloader workers")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    values = dict(ckpt["config"])
    for key in ("dataset", "data_root", "image_size", "resize", "workers"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.batch_size is not None:
        values["eval_batch_size"] = args.batch_size
    values.update(test_flip=args.flip, amp=args.amp, device=args.device, progress=False)
    cfg = TrainConfig(**values).validate()

    device_name = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu"
    )  # fmt: skip
    dev = init_distributed_device_so(device=device_name)
    device = torch.device(dev["device"])
    try:
        test_set = build_dataset(cfg, "test")
        model = build_model(TrainConfig(**{**values, "pretrained": False}), len(ckpt["classes"]))
        if args.ema:
            if ckpt.get("ema") is None:
                raise ValueError(
                    f"--ema: checkpoint {args.checkpoint} holds no EMA weights (train with --ema)"
                )
            # ModelEmaV3 keeps the averaged copy as `module`.
            state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items()}
        else:
            state = ckpt["model"]
        model.load_state_dict(state)
        model.to(device)
        if len(test_set.classes) != len(ckpt["classes"]):
            raise ValueError(
                f"test set has {len(test_set.classes)} classes, the checkpoint was trained on "
                f"{len(ckpt['classes'])}"
            )
        loader = build_eval_loader(test_set, cfg, dev["global_rank"], dev["world_size"], device)
        metrics = evaluate(model, loader, device, cfg)
        if dev["global_rank"] == 0:
            mode = "centre crop + flip" if args.flip else "centre crop"
            print(
                f"{args.checkpoint}: {cfg.dataset} test, {metrics['count']} images, {mode}: "
                f"top-1 {metrics['top1']:.2f} %  top-5 {metrics['top5']:.2f} %  "
                f"loss {metrics['loss']:.4f}",
                flush=True,
            )
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(metrics, f, indent=2)
        return metrics
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
