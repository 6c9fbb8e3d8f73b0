"""The training loop shared by examples/train_pcanet.py and examples/train_cin.py.

One process per device; under ``torchrun`` the processes form a DistributedDataParallel group
(nccl on GPUs, gloo on CPUs). Each process draws its own paired batches (see `fgattn.data`
samplers), so ``batch_size`` is per process. Evaluation shards the test set without padding and
sums exact counts over ranks.

Run directory ``<output>/<name>/``: config.yaml (resolved config), summary.csv (one row per
epoch), loss.png / accuracy.png, last.pth (end of every epoch, or on SIGTERM mid-epoch), best.pth
(model weights of the best test top-1).

Resume is exact: a checkpoint holds the model, optimizer, scheduler, grad scaler, EMA, the epoch and
step within it, every rank's RNG states and the metric sums of the unfinished epoch. Data
augmentation is seeded per drawn sample (`fgattn.data.SeededDataset`), so it does not depend on
dataloader workers or on where a run was interrupted.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3, random_seed
from timm.utils.distributed import init_distributed_device_so
from torch.nn.parallel import DistributedDataParallel

from .. import data as fgdata
from .checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from .config import TrainConfig, resolve_config, save_yaml

CKPT_FORMAT = "fgattn-train-1"


# ----------------------------------------------------------------------------- setup helpers
def _print(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def build_dataset(cfg: TrainConfig, split: str, transform: Any = "auto"):
    """The ``split`` ("train" / "test") dataset of ``cfg``, with its FGVC transform by default."""
    if transform == "auto":
        transform = fgdata.create_transform(
            split == "train", cfg.image_size, cfg.resize, hflip=cfg.hflip
        )
    kwargs: dict[str, Any] = {}
    if cfg.dataset == "synthetic":
        train = split == "train"
        per_class = cfg.synthetic_train_per_class if train else cfg.synthetic_test_per_class
        kwargs = dict(num_classes=cfg.synthetic_classes, images_per_class=per_class,
                      image_size=cfg.resize, seed=cfg.seed)  # fmt: skip
    elif cfg.dataset == "aircraft":
        kwargs = dict(annotation_level=cfg.annotation_level, crop_banner=cfg.crop_banner)
    return fgdata.create_dataset(cfg.dataset, cfg.data_root, split, transform, **kwargs)


def build_datasets(cfg: TrainConfig) -> tuple[Any, Any]:
    """(train, test) datasets with the FGVC transforms of ``cfg``."""
    return build_dataset(cfg, "train"), build_dataset(cfg, "test")


def build_sampler(cfg: TrainConfig, targets: list[int], rank: int, world: int):
    if cfg.arch == "pcanet":
        sampler = fgdata.PairBatchSampler(
            targets, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world, with_seeds=True
        )
    else:
        sampler = fgdata.PKBatchSampler(
            targets, cfg.pk_classes, cfg.pk_images, seed=cfg.seed, rank=rank, world_size=world,
            with_seeds=True,
        )  # fmt: skip
    return sampler


def build_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    import fgattn

    if not hasattr(fgattn, "create_model"):
        raise ImportError("fgattn.create_model is not available in this fgattn version")
    return fgattn.create_model(
        cfg.arch,
        backbone=cfg.backbone,
        num_classes=num_classes,
        pretrained=cfg.pretrained,
        **cfg.model_kwargs,
    )


def autocast_context(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    cfg: TrainConfig,
    desc: str = "test",
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole test set.

    Each rank evaluates its own shard (`ShardedEvalSampler`, no padding); correct counts and loss
    sums are added over ranks, so the numbers are exact whatever the number of processes.
    With ``cfg.test_flip`` the logits of each image and its mirror image are averaged.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    bar = _progress(loader, desc, cfg)
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(cfg, device):
            logits = model(images).float()
            if cfg.test_flip:
                logits = (logits + model(images.flip(3)).float()) / 2
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == targets[:, None]
        sums += torch.stack(
            [
                torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double(),
                hit[:, 0].sum().double(),
                hit.any(dim=1).sum().double(),
                torch.tensor(float(targets.numel()), dtype=torch.float64, device=device),
            ]
        )
    if dist.is_initialized():
        dist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "count": int(n)}


def build_eval_loader(dataset, cfg: TrainConfig, rank: int, world: int, device: torch.device):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.eval_batch_size,
        sampler=fgdata.ShardedEvalSampler(len(dataset), rank, world),
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
    )


# ----------------------------------------------------------------------------- progress / logs
def _progress(iterable, desc: str, cfg: TrainConfig, total: int | None = None, initial: int = 0):
    primary = not dist.is_initialized() or dist.get_rank() == 0
    if not (cfg.progress and primary):
        return iterable
    try:
        from tqdm.auto import tqdm  # installed with timm (via huggingface_hub)
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, initial=initial, leave=False, dynamic_ncols=True)


def write_summary(history: list[dict[str, float]], run_dir: Path) -> None:
    """Rewrite summary.csv from the full history, atomically.

    Rewritten rather than appended (as timm's update_summary does) so that a run resumed after a
    crash between the checkpoint and the CSV write never duplicates or loses a row.
    """
    if not history:
        return
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    tmp = run_dir / ".summary.csv.tmp"
    tmp.write_text(buf.getvalue())
    os.replace(tmp, run_dir / "summary.csv")


_warned_matplotlib = False


def write_plots(history: list[dict[str, float]], run_dir: Path) -> bool:
    """loss.png and accuracy.png from the history; skipped (with a message) without matplotlib."""
    global _warned_matplotlib
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned_matplotlib:
            print("matplotlib is not installed: skipping loss/accuracy plots "
                  "(pip install matplotlib)", flush=True)  # fmt: skip
            _warned_matplotlib = True
        return False
    epochs = [row["epoch"] for row in history]
    for name, keys, ylabel in (
        ("loss", [k for k in history[-1] if "loss" in k], "loss"),
        ("accuracy", [k for k in history[-1] if k.endswith(("top1", "top5", "acc"))], "%"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            pts = [(e, row[key]) for e, row in zip(epochs, history, strict=True) if key in row]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / f"{name}.png", dpi=100)
        plt.close(fig)
    return True


# ----------------------------------------------------------------------------- signals
class _StopFlag:
    """Set by SIGTERM / SIGINT; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (all ranks must stop at the same step)."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ----------------------------------------------------------------------------- training
def _gather_rng() -> list[dict[str, Any]]:
    state = rng_state()
    if not dist.is_initialized():
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def _meter_keys(out: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in out.items() if k.startswith("loss") and torch.is_tensor(v)]


def train(cfg: TrainConfig, resume_ckpt: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or continue) training as configured; returns the final metrics.

    Returns a dict with "status" ("finished" or "interrupted"), "run_dir", "epoch" and the last
    test metrics ("test_top1", ...).
    """
    dev = init_distributed_device_so(device=_resolve_device(cfg.device))
    device = torch.device(dev["device"])
    rank, world = dev["global_rank"], dev["world_size"]
    primary = rank == 0
    random_seed(cfg.seed, rank)

    # Run directory: rank 0 picks the name (its timestamp) and shares it.
    name = cfg.name or f"{cfg.arch}-{cfg.dataset}-{cfg.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
    if dist.is_initialized():
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    cfg.name = name
    run_dir = Path(cfg.output) / name
    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
        _print(f"run directory: {run_dir}  (world size {world}, device {device})")

    train_set, test_set = build_datasets(cfg)
    num_classes = len(train_set.classes)
    sampler = build_sampler(cfg, fgdata.targets_of(train_set), rank, world)
    loader = torch.utils.data.DataLoader(
        fgdata.SeededDataset(train_set),
        batch_sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        # Its own generator: creating iterators then never consumes the global RNG.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    test_loader = build_eval_loader(test_set, cfg, rank, world, device)
    steps_per_epoch = len(sampler)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)

    model = build_model(cfg, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and dist.is_initialized():
        if device.type != "cuda":
            raise ValueError(
                f"sync_bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU), got "
                f"device {device}; drop --sync-bn"
            )
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    from timm.optim import create_optimizer_v2
    from timm.scheduler import StepLRScheduler

    # Plain SGD over all parameters, weight decay included, as the papers train.
    optimizer = create_optimizer_v2(
        model, "sgd", lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
        filter_bias_and_bn=False,
    )  # fmt: skip
    scheduler = StepLRScheduler(optimizer, decay_t=cfg.lr_step, decay_rate=cfg.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None

    start_epoch, start_step, history, best = 0, 0, [], -1.0
    partial: dict[str, float] = {}
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        if resume_ckpt.get("scaler"):
            scaler.load_state_dict(resume_ckpt["scaler"])
        if ema is not None and resume_ckpt.get("ema") is not None:
            ema.load_state_dict(resume_ckpt["ema"])
        start_epoch, start_step = int(resume_ckpt["epoch"]), int(resume_ckpt["step"])
        history = list(resume_ckpt.get("history", []))
        best = float(resume_ckpt.get("best_top1", -1.0))
        partial = dict(resume_ckpt.get("partial_sums", {}))
        states = resume_ckpt.get("rng", [])
        if len(states) == world:
            set_rng_state(states[rank])
        else:
            _print(f"warning: checkpoint holds RNG states of {len(states)} processes, this run "
                   f"has {world}; reseeding (the continuation will not be bit-exact)")  # fmt: skip
        _print(f"resumed at epoch {start_epoch}, step {start_step}")

    model_without_ddp = model
    if dist.is_initialized():
        model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )
    train_model = torch.compile(model) if cfg.compile else model
    eval_model = torch.compile(model_without_ddp) if cfg.compile else model_without_ddp

    stop = _StopFlag()
    stop.install()

    def checkpoint(epoch: int, step: int, sums: dict[str, float]) -> None:
        rngs = _gather_rng()  # collective: every rank takes part
        if not primary:
            return
        state = {
            "format": CKPT_FORMAT,
            "config": cfg.to_dict(),
            "classes": list(train_set.classes),
            "epoch": epoch,
            "step": step,
            "model": model_without_ddp.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "ema": ema.state_dict() if ema is not None else None,
            "rng": rngs,
            "history": history,
            "best_top1": best,
            "partial_sums": sums,
        }
        save_atomic(state, run_dir / "last.pth")

    result: dict[str, Any] = {"status": "finished", "run_dir": str(run_dir)}
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            scheduler.step(epoch)  # lr is a function of the epoch alone: exact on resume
            sampler.set_epoch(epoch, start_batch=start_step)
            train_model.train()
            sums = partial if start_step else {}
            partial = {}
            bar = _progress(
                loader, f"epoch {epoch + 1}/{cfg.epochs}", cfg, steps_per_epoch, start_step
            )
            step = start_step
            for images, targets in bar:
                if step >= steps_per_epoch:
                    break
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast_context(cfg, device):
                    out = train_model(images, targets)
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss.item()} at epoch {epoch}, step {step}: lower the lr or "
                        "use --amp bf16 instead of fp16"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                if ema is not None:
                    ema.update(model_without_ddp, step=epoch * steps_per_epoch + step)
                step += 1
                n = float(targets.numel())
                with torch.no_grad():
                    correct = (out["logits"].argmax(1) == targets).sum().item()
                for key in _meter_keys(out):
                    sums[key] = sums.get(key, 0.0) + out[key].item() * n
                sums["correct"] = sums.get("correct", 0.0) + correct
                sums["count"] = sums.get("count", 0.0) + n
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss.item():.3f}",
                                    acc=f"{100 * sums['correct'] / sums['count']:.1f}")  # fmt: skip
                if stop.agreed(device):
                    checkpoint(epoch, step, sums)
                    result["status"] = "interrupted"
                    last = run_dir / "last.pth"
                    _print(f"stop requested: saved {last} at epoch {epoch}, step {step}; "
                           f"continue with --resume {last}")  # fmt: skip
                    return result
            start_step = 0
            if hasattr(bar, "close"):
                bar.close()

            row: dict[str, float] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            row.update(_reduce_sums(sums, device))
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                _sync_buffers(model_without_ddp)
                metrics = evaluate(eval_model, test_loader, device, cfg)
                row.update({f"test_{k}": v for k, v in metrics.items()})
                if ema is not None:
                    ema_metrics = evaluate(ema.module, test_loader, device, cfg, "test (EMA)")
                    row.update({f"ema_test_{k}": v for k, v in ema_metrics.items() if k != "count"})
                if metrics["top1"] > best:
                    best = metrics["top1"]
                    if primary:
                        save_atomic(
                            {"format": CKPT_FORMAT, "config": cfg.to_dict(),
                             "classes": list(train_set.classes), "epoch": epoch + 1,
                             "model": model_without_ddp.state_dict(),
                             "ema": ema.state_dict() if ema is not None else None,
                             "test_top1": best},
                            run_dir / "best.pth",
                        )  # fmt: skip
            row["epoch_time_s"] = time.time() - t0
            history.append(row)
            checkpoint(epoch + 1, 0, {})
            if primary:
                write_summary(history, run_dir)
                if cfg.plots:
                    write_plots(history, run_dir)
                _print(_format_row(row))
            result.update({k: v for k, v in row.items()})
            if stop.agreed(device):
                result["status"] = "interrupted"
                _print(f"stop requested: saved {run_dir / 'last.pth'} after epoch {epoch + 1}")
                return result
    finally:
        stop.uninstall()
    result["epoch"] = cfg.epochs
    result["best_top1"] = best
    return result


def _sync_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics, class centres).

    DDP broadcasts buffers at the start of each forward, so after the last step every rank holds
    its own update; evaluating with rank 0's copy makes the sharded evaluation measure exactly
    the weights that are checkpointed.
    """
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Epoch means of the per-sample sums, over all ranks."""
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(values)
    total = dict(zip(keys, values.tolist(), strict=True))
    count = max(total.get("count", 0.0), 1.0)
    out = {f"train_{k}": v / count for k, v in total.items() if k.startswith("loss")}
    out["train_acc"] = 100 * total.get("correct", 0.0) / count
    return out


def _format_row(row: dict[str, float]) -> str:
    parts = []
    for k, v in row.items():
        if k == "epoch":
            parts.append(f"epoch {int(v)}")
        elif isinstance(v, float) and not math.isnan(v):
            parts.append(f"{k} {v:.4g}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------- entry point
def main(arch: str, argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point of the training scripts (see ``--help``)."""
    cfg = resolve_config(arch, argv)
    ckpt = None
    if cfg.resume:
        path = Path(cfg.resume)
        if cfg.resume == "auto":
            if not cfg.name:
                raise ValueError("--resume auto needs --name (the run to continue), got no name")
            path = Path(cfg.output) / cfg.name / "last.pth"
        if path.is_file():
            ckpt = load_checkpoint(path)
            if ckpt.get("format") != CKPT_FORMAT or "optimizer" not in ckpt:
                raise ValueError(
                    f"--resume {path}: not a training checkpoint of this version (wanted format "
                    f"{CKPT_FORMAT!r} with optimizer state, got {ckpt.get('format')!r}); "
                    "best.pth holds weights only — resume from last.pth"
                )
            if ckpt["config"].get("arch") != arch:
                raise ValueError(
                    f"--resume {path}: checkpoint was trained with arch "
                    f"{ckpt['config'].get('arch')!r}, this script trains {arch!r}"
                )
            cfg = resolve_config(arch, argv, base=ckpt["config"])
            # Continue in the checkpoint's run directory unless told otherwise.
            flags = " ".join(argv if argv is not None else sys.argv[1:])
            if "--output" not in flags:
                cfg.output = str(path.parent.parent)
            if "--name" not in flags:
                cfg.name = path.parent.name
        elif cfg.resume != "auto":
            raise FileNotFoundError(f"--resume checkpoint file not found: {path}")
    try:
        return train(cfg, ckpt)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
