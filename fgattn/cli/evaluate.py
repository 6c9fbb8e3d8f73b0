"""``fgattn-eval``: top-1 / top-5 of a training checkpoint on the test split.

    fgattn-eval runs/<run>/best.pth
    fgattn-eval runs/<run>/best.pth --flip          # + mirror image, logits averaged
    fgattn-eval runs/<run>/last.pth --ema --data-root /data/cub
    torchrun --nproc_per_node 4 -m fgattn.cli.evaluate runs/<run>/best.pth   # exact, sharded

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

from ..data import align_classes
from ..train import (
    TrainConfig,
    build_dataset,
    build_eval_loader,
    build_model,
    evaluate,
    load_checkpoint,
    load_weights,
    resolve_device,
)
from ..train.config import AMP_MODES, CHOICES
from . import UserErrors


def _minimum(low: int):
    """An argparse type: an int >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"wanted an int >= {low}, got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("checkpoint", help="last.pth or best.pth of a training run")
    p.add_argument("--flip", action="store_true", help="average logits with the mirrored image")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    p.add_argument("--dataset", choices=CHOICES["dataset"],
                   help="dataset to evaluate on [the checkpoint's]")  # fmt: skip
    p.add_argument("--data-root", help="folder of the dataset [the checkpoint's]")
    p.add_argument("--image-size", type=_minimum(16),
                   help="centre-crop side in pixels [the checkpoint's]")  # fmt: skip
    p.add_argument("--resize", type=_minimum(16),
                   help="shorter side before the crop [the checkpoint's]")  # fmt: skip
    p.add_argument("--batch-size", type=_minimum(1),
                   help="evaluation batch size [the checkpoint's]")  # fmt: skip
    p.add_argument("--workers", type=_minimum(0), help="dataloader workers [the checkpoint's]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    p.add_argument("--amp", choices=AMP_MODES, default="none", help="mixed precision [none]")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _config(args: argparse.Namespace, ckpt: dict) -> TrainConfig:
    """The checkpoint's config under the command's overrides."""
    values = dict(ckpt["config"])
    for key in ("dataset", "data_root", "image_size", "resize", "workers"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.batch_size is not None:
        values["eval_batch_size"] = args.batch_size
    values.update(test_flip=args.flip, amp=args.amp, device=args.device, progress=False)
    # The checkpoint holds the weights: no ImageNet download, no local weights file needed.
    values.update(pretrained=False, pretrained_file=None)
    return TrainConfig(**values).validate()


def checkpoint_test_split(cfg: TrainConfig, classes: list[str], checkpoint: str):
    """The test split of ``cfg``'s dataset, labelled by the checkpoint's ``classes`` (matched by
    name: a dataset with other classes is an error, one lacking some is said)."""
    test_set = build_dataset(cfg, "test")
    where = f" in {cfg.data_root}" if cfg.data_root else ""
    missing = align_classes(test_set, classes, f"the {cfg.dataset} test split{where}",
                            f"checkpoint {checkpoint}")  # fmt: skip
    if missing:
        print(f"warning: the test split has no images of {len(missing)} of the checkpoint's "
              f"{len(classes)} classes; accuracy is over the others", file=sys.stderr)  # fmt: skip
    return test_set


def _weights(args: argparse.Namespace, ckpt: dict) -> dict:
    if not args.ema:
        return ckpt["model"]
    if ckpt.get("ema") is None:
        raise ValueError(
            f"--ema: checkpoint {args.checkpoint} holds no EMA weights (train with --ema)"
        )
    # ModelEmaV3 keeps the averaged copy as `module`.
    return {k.removeprefix("module."): v for k, v in ckpt["ema"].items()}


def run(argv: list[str] | None = None, prog: str | None = None) -> dict[str, float]:
    """Evaluate as ``argv`` says; returns the metrics (top1, top5, loss, count). Raises errors."""
    args = build_parser(prog).parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    cfg = _config(args, ckpt)
    dev = init_distributed_device_so(device=resolve_device(cfg.device))
    device = torch.device(dev["device"])
    try:
        test_set = checkpoint_test_split(cfg, ckpt["classes"], args.checkpoint)
        model = build_model(cfg, len(ckpt["classes"]))
        load_weights(model, _weights(args, ckpt), f"checkpoint {args.checkpoint}")
        model.to(device)
        loader = build_eval_loader(test_set, cfg, dev["global_rank"], dev["world_size"], device)
        metrics = evaluate(model, loader, device, cfg)
        if dev["global_rank"] == 0:
            _report(args, cfg, metrics)
        return metrics
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _report(args: argparse.Namespace, cfg: TrainConfig, metrics: dict[str, float]) -> None:
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


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``fgattn-eval``: `run`, with user errors as one line and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with UserErrors(argv, prog):
        run(argv, prog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
