"""The training loop shared by examples/train_pcanet.py and examples/train_cin.py.

One process per device; under ``torchrun`` the processes form a DistributedDataParallel group
(nccl on GPUs, gloo on CPUs). Each process draws its own paired batches (see `fgattn.data`
samplers), so ``batch_size`` is per process. Evaluation shards the test set without padding and
sums exact counts over ranks.

Run directory ``<output>/<name>/``: config.yaml (resolved config), summary.csv (one row per
epoch), loss.png / accuracy.png, last.pth (end of every epoch, or on SIGTERM mid-epoch), best.pth
(model weights of the best test top-1), confusion.csv / confusion_worst.png (the test confusion
of best.pth's weights; the PNG shows the classes of lowest accuracy). The folder belongs to one run
(`rundir`: checkpoints carry the run's id); weights that are not finite are never saved.

Resume is exact: a checkpoint holds the model, optimizer, scheduler, grad scaler, EMA, the epoch and
step within it, every rank's RNG states and the metric sums of the unfinished epoch. Data
augmentation is seeded per drawn sample (`fgattn.data.SeededDataset`), so it does not depend on
dataloader workers or on where a run was interrupted.

`train` reads top to bottom as the recipe: build the data, model and optimiser (`TrainState`),
then per epoch `train_one_epoch`, `evaluate`, `checkpoint_state` to last.pth / best.pth and
`fgattn.train.logging`; `_StopFlag` turns SIGTERM / SIGINT into a checkpoint and a clean exit.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import ModelEmaV3, random_seed
from timm.utils.distributed import init_distributed_device_so
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import data as fgdata
from ..models import create_model
from . import rundir
from .checkpoint import load_checkpoint, load_weights, rng_state, save_atomic, set_rng_state
from .config import TrainConfig, resolve_config, save_yaml
from .logging import log_epoch, write_confusion

CKPT_FORMAT = "fgattn-train-1"
# Up to this many classes a run keeps the test confusion matrix (K² int64 counts: 32 MiB here).
CONFUSION_MAX_CLASSES = 2048


# ----------------------------------------------------------------------------- builders
def _is_primary() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _print(*args, **kwargs) -> None:
    if _is_primary():
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
    """(train, test) datasets with the FGVC transforms of ``cfg``, the test labels matched to the
    training classes by name (`fgattn.data.align_classes`)."""
    train_set, test_set = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    missing = fgdata.align_classes(test_set, train_set.classes, "the test split")
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        _print(f"warning: the test split has no images of {len(missing)} of the "
               f"{len(train_set.classes)} training classes ({shown}); test accuracy is over "
               f"the others")  # fmt: skip
    return train_set, test_set


def build_sampler(cfg: TrainConfig, targets: list[int], rank: int, world: int):
    """The paired-batch sampler of ``cfg.arch``: N + N partners (PCA-Net) or P × K (CIN)."""
    if cfg.arch == "pcanet":
        return fgdata.PairBatchSampler(
            targets, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world, with_seeds=True
        )
    return fgdata.PKBatchSampler(
        targets, cfg.pk_classes, cfg.pk_images, seed=cfg.seed, rank=rank, world_size=world,
        with_seeds=True,
    )  # fmt: skip


def build_train_loader(dataset, sampler, cfg: TrainConfig, device: torch.device):
    """Paired batches of ``dataset`` from ``sampler``, each sample augmented by its own seed."""
    return torch.utils.data.DataLoader(
        fgdata.SeededDataset(dataset),
        batch_sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        # Its own generator: creating iterators then never consumes the global RNG.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def build_eval_loader(dataset, cfg: TrainConfig, rank: int, world: int, device: torch.device):
    """This rank's shard of ``dataset`` (no padding), in order."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.eval_batch_size,
        sampler=fgdata.ShardedEvalSampler(len(dataset), rank, world),
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
    )


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """``fgattn.create_model`` of ``cfg.arch`` on ``cfg.backbone``; ``cfg.pretrained_file`` is
    timm's ``pretrained_cfg_overlay=dict(file=...)`` (ImageNet weights from a local file)."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.pretrained and cfg.pretrained_file:
        if not Path(cfg.pretrained_file).is_file():
            raise FileNotFoundError(f"--pretrained-file not found: {cfg.pretrained_file}")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(cfg.pretrained_file))
    return create_model(
        cfg.arch,
        backbone=cfg.backbone,
        num_classes=num_classes,
        pretrained=cfg.pretrained,
        **kwargs,
    )


def _place_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """Move to ``device``, channels_last and SyncBatchNorm as configured."""
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and dist.is_initialized():
        if device.type != "cuda":
            raise ValueError(
                f"sync_bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU), got "
                f"device {device}; drop --sync-bn"
            )
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _wrap_model(model: nn.Module, cfg: TrainConfig, device: torch.device):
    """(model to train, model to evaluate): DDP under torchrun for training, compiled if asked."""
    train_model = model
    if dist.is_initialized():
        train_model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )
    if cfg.compile:
        return torch.compile(train_model), torch.compile(model)
    return train_model, model


def autocast_context(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def resolve_device(name: str) -> str:
    """The device of ``--device``: "auto" is CUDA when there is a GPU, else the CPU; asking for a
    CUDA device that this machine does not have is a ValueError that says so."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: this machine has no CUDA GPU that torch can use "
                f"(torch.cuda.is_available() is False); use --device cpu or auto"
            )
        index = name.partition(":")[2]
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return name


@contextlib.contextmanager
def _run_folder(
    cfg: TrainConfig, device: torch.device, world: int, resume: rundir.RunIdentity | None
) -> Iterator[tuple[Path, rundir.RunLock | None]]:
    """Name the run (rank 0 picks it, with its timestamp, for every rank); rank 0 claims the
    folder for the run's duration (`rundir.claim`: no other run's files, no second writer) and
    writes config.yaml. Yields (folder, lock; None on other ranks). If the run fails before its
    first checkpoint, a folder it created is removed and a run it was replacing comes back."""
    name = cfg.name or f"{cfg.arch}-{cfg.dataset}-{cfg.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
    if dist.is_initialized():
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    cfg.name = name
    run_dir = Path(cfg.output) / name
    if not _is_primary():
        yield run_dir, None
        return
    fresh = not run_dir.exists()
    with rundir.claim(run_dir, resume=resume, overwrite=cfg.overwrite) as lock:
        save_yaml(cfg, run_dir / "config.yaml")
        _print(f"run directory: {run_dir}  (world size {world}, device {device})")
        if lock.replaced:
            _print(f"--overwrite: {run_dir} holds a previous run; its files "
                   f"({', '.join(lock.replaced)}) are kept in {lock.previous} until this run "
                   f"writes its first checkpoint, then removed")  # fmt: skip
        try:
            yield run_dir, lock
        except BaseException:
            if lock.replaced:
                restored = lock.restore()
                _print(f"--overwrite: this run failed before its first checkpoint; the previous "
                       f"run's files are back in {run_dir} ({', '.join(restored)})")  # fmt: skip
            elif fresh:  # a start that failed before its first checkpoint leaves no folder behind
                rundir.remove_failed_start(run_dir)
            raise


def _first_checkpoint_written(lock: rundir.RunLock | None) -> None:
    """An --overwrite'n run's files go once this run has a checkpoint of its own."""
    if lock is not None and lock.replaced:
        removed = lock.commit()
        _print(f"--overwrite: removed the previous run's files ({', '.join(removed)})")


def _to_device(images, targets, cfg: TrainConfig, device: torch.device):
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets


def _progress(iterable, desc: str, cfg: TrainConfig, total: int | None = None, initial: int = 0):
    """A tqdm bar on a terminal; where stderr is not one (nohup, CI logs, a pipe), where a bar's
    carriage returns pile up into one line, a plain `LineProgress` line now and then instead."""
    if not (cfg.progress and _is_primary()):
        return iterable
    if not sys.stderr.isatty():
        return LineProgress(iterable, desc, total, initial)
    try:
        from tqdm.auto import tqdm  # installed with timm (via huggingface_hub)
    except ImportError:
        return LineProgress(iterable, desc, total, initial)
    return tqdm(iterable, desc=desc, total=total, initial=initial, leave=False, dynamic_ncols=True)


class LineProgress:
    """Progress for logs: after the first step, then every ``every_s`` seconds, one line on stdout,
    e.g. "epoch 2/6: step 120/375 (32 %) | loss=2.345 acc=45.1 | 1.9 steps/s". Wraps an iterable
    like tqdm (``set_postfix``, ``close``)."""

    every_s: float = 60.0

    def __init__(self, iterable, desc: str, total: int | None = None, initial: int = 0) -> None:
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.n = iterable, desc, total, initial
        self.postfix: dict[str, Any] = {}
        self._start = self._last = None

    def __iter__(self):
        self._start = time.perf_counter()
        first = self.n
        for item in self.iterable:
            yield item
            self.n += 1
            now = time.perf_counter()
            if self._last is None or now - self._last >= self.every_s:
                self._last = now
                rate = (self.n - first) / max(now - self._start, 1e-9)
                print(self.line(rate), flush=True)

    def line(self, rate: float) -> str:
        where = f"step {self.n}" + (
            f"/{self.total} ({100 * self.n // max(self.total, 1)} %)" if self.total else ""
        )
        postfix = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return " | ".join(p for p in (f"{self.desc}: {where}", postfix, f"{rate:.3g} steps/s") if p)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- training state
def new_run_id() -> str:
    """A run's identity, carried by its checkpoints (see `rundir`)."""
    return uuid.uuid4().hex[:16]


@dataclass
class TrainState:
    """What training updates and a checkpoint restores: the bare model (no DDP, not compiled), its
    optimiser, lr schedule, grad scaler and EMA, and where the run stands.

    ``epoch`` and ``step`` are the epochs done and the steps done in the next one; ``partial_sums``
    are that unfinished epoch's metric sums. `train_one_epoch` advances them step by step, so the
    state can be checkpointed at any step boundary.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None
    epoch: int = 0
    step: int = 0
    partial_sums: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    best_top1: float = -1.0
    run_id: str = field(default_factory=new_run_id)


def create_train_state(cfg: TrainConfig, model: nn.Module, device: torch.device) -> TrainState:
    """The papers' optimisation: plain SGD over all parameters (weight decay included) and a step
    lr schedule; a GradScaler for fp16 and an EMA of the weights when asked."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import StepLRScheduler

    optimizer = create_optimizer_v2(
        model, "sgd", lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
        filter_bias_and_bn=False,
    )  # fmt: skip
    return TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=StepLRScheduler(optimizer, decay_t=cfg.lr_step, decay_rate=cfg.lr_gamma),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"),
        ema=ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None,
    )


def load_train_state(state: TrainState, ckpt: dict[str, Any], rank: int, world: int) -> None:
    """Restore ``state`` and this rank's RNG states from a last.pth checkpoint."""
    load_weights(state.model, ckpt["model"], "the --resume checkpoint")
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    if state.ema is not None and ckpt.get("ema") is not None:
        state.ema.load_state_dict(ckpt["ema"])
    state.epoch, state.step = int(ckpt["epoch"]), int(ckpt["step"])
    state.history = list(ckpt.get("history", []))
    state.best_top1 = float(ckpt.get("best_top1", -1.0))
    state.partial_sums = dict(ckpt.get("partial_sums", {}))
    state.run_id = ckpt.get("run_id") or state.run_id  # checkpoints before run ids: a new one
    states = ckpt.get("rng", [])
    if len(states) == world:
        set_rng_state(states[rank])
    else:
        _print(f"warning: checkpoint holds RNG states of {len(states)} processes, this run "
               f"has {world}; reseeding (the continuation will not be bit-exact)")  # fmt: skip


def checkpoint_state(
    cfg: TrainConfig, classes: list[str], state: TrainState, rngs: list[Any] | None = None
) -> dict[str, Any]:
    """The checkpoint of ``state``, loadable with ``weights_only=True``.

    With ``rngs`` (every rank's RNG states, `_gather_rng`): last.pth, everything exact resume
    needs. Without: best.pth, the weights (model and EMA) and their test top-1 only.
    """
    ckpt = {
        "format": CKPT_FORMAT,
        "run_id": state.run_id,
        "config": cfg.to_dict(),
        "classes": list(classes),
        "epoch": state.epoch,
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None,
    }
    if rngs is None:
        return {**ckpt, "test_top1": state.best_top1}
    return {
        **ckpt,
        "step": state.step,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
        "rng": rngs,
        "history": state.history,
        "best_top1": state.best_top1,
        "partial_sums": state.partial_sums,
    }


def check_finite_weights(state: TrainState) -> None:
    """Raise FloatingPointError if any floating-point weight or buffer of the model (or its EMA)
    is NaN or infinite: such weights are never written to a checkpoint."""
    named = dict(state.model.state_dict())
    if state.ema is not None:
        named.update({f"ema.{k}": v for k, v in state.ema.state_dict().items()})
    floats = {k: v for k, v in named.items() if torch.is_tensor(v) and v.is_floating_point()}
    if not floats or bool(torch.stack([torch.isfinite(v).all() for v in floats.values()]).all()):
        return
    bad = [k for k, v in floats.items() if not bool(torch.isfinite(v).all())]
    when = (f"in epoch {state.epoch + 1}, after step {state.step}" if state.step
            else f"after epoch {state.epoch}")  # fmt: skip
    raise FloatingPointError(
        f"the weights are not finite {when} ({len(bad)} tensors, first {bad[0]}); they are not "
        f"saved (the run folder's checkpoints keep the last finite state): lower --lr or set "
        f"--grad-clip"
    )


def _gather_rng() -> list[dict[str, Any]]:
    state = rng_state()
    if not dist.is_initialized():
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def save_last(cfg: TrainConfig, classes: list[str], state: TrainState, run_dir: Path) -> Path:
    """Write last.pth (rank 0). Collective: every rank takes part (their RNG states go in)."""
    check_finite_weights(state)
    rngs = _gather_rng()
    path = run_dir / "last.pth"
    if _is_primary():
        save_atomic(checkpoint_state(cfg, classes, state, rngs), path)
    return path


def save_best(
    cfg: TrainConfig,
    classes: list[str],
    state: TrainState,
    run_dir: Path,
    confusion: torch.Tensor | None = None,
) -> None:
    """Write best.pth (rank 0): the weights of ``state`` and their test top-1; with their test
    ``confusion`` matrix, also confusion.csv and confusion_worst.png (`write_confusion`)."""
    check_finite_weights(state)
    if not _is_primary():
        return
    save_atomic(checkpoint_state(cfg, classes, state), run_dir / "best.pth")
    if confusion is not None:
        caption = f"{cfg.name}, epoch {state.epoch}: test top-1 {state.best_top1:.2f} %"
        write_confusion(confusion, classes, run_dir, caption, cfg.plots)


# ----------------------------------------------------------------------------- signals
class _StopFlag:
    """While the block runs, SIGTERM / SIGINT only set ``requested``: the loop then saves a
    checkpoint at the next step boundary and exits. The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
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


# ----------------------------------------------------------------------------- one epoch
def train_step(
    cfg: TrainConfig,
    state: TrainState,
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    device: torch.device,
    global_step: int,
) -> dict[str, Any]:
    """One optimiser step on a paired batch; returns the model's output dict."""
    with autocast_context(cfg, device):
        out = model(images, targets)
    loss = out["loss"]
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss.item()} at epoch {state.epoch}, step {state.step}: lower the lr or "
            "use --amp bf16 instead of fp16"
        )
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if cfg.grad_clip:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.ema is not None:
        state.ema.update(state.model, step=global_step)
    return out


def _add_to_sums(sums: dict[str, float], out: dict[str, Any], targets: torch.Tensor) -> None:
    """Per-sample sums of every loss in ``out``, of correct predictions and of samples."""
    n = float(targets.numel())
    with torch.no_grad():
        correct = (out["logits"].argmax(1) == targets).sum().item()
    for key in [k for k, v in out.items() if k.startswith("loss") and torch.is_tensor(v)]:
        sums[key] = sums.get(key, 0.0) + out[key].item() * n
    sums["correct"] = sums.get("correct", 0.0) + correct
    sums["count"] = sums.get("count", 0.0) + n


def train_one_epoch(
    cfg: TrainConfig, state: TrainState, model, loader, steps: int, device, stop: _StopFlag
) -> bool:
    """Train epoch ``state.epoch`` from step ``state.step`` to ``steps``; False if told to stop.

    ``state.step`` and ``state.partial_sums`` follow every step, so on a stop the state is ready
    to checkpoint mid-epoch.
    """
    model.train()
    if not state.step:
        state.partial_sums = {}
    sums = state.partial_sums
    desc = f"epoch {state.epoch + 1}/{cfg.epochs}"
    bar = _progress(loader, desc, cfg, steps, state.step)
    try:
        for images, targets in bar:
            if state.step >= steps:
                break
            images, targets = _to_device(images, targets, cfg, device)
            global_step = state.epoch * steps + state.step
            out = train_step(cfg, state, model, images, targets, device, global_step)
            state.step += 1
            _add_to_sums(sums, out, targets)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{out['loss'].item():.3f}",
                                acc=f"{100 * sums['correct'] / sums['count']:.1f}")  # fmt: skip
            if stop.agreed(device):
                return False
    finally:
        if hasattr(bar, "close"):
            bar.close()
    return True


def _steps_per_epoch(sampler, cfg: TrainConfig) -> int:
    steps = len(sampler)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    return steps


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


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    cfg: TrainConfig,
    desc: str = "test",
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the whole test set.

    Each rank evaluates its own shard (`ShardedEvalSampler`, no padding); correct counts and loss
    sums are added over ranks, so the numbers are exact whatever the number of processes.
    With ``cfg.test_flip`` the logits of each image and its mirror image are averaged.
    With ``num_classes`` (K) the result also holds "confusion", the (K, K) int64 CPU tensor of
    test images of class i predicted as j, likewise summed over ranks.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    k = num_classes or 0
    confusion = torch.zeros(k * k, dtype=torch.int64, device=device)
    for images, targets in _progress(loader, desc, cfg):
        images, targets = _to_device(images, targets, cfg, device)
        with autocast_context(cfg, device):
            logits = model(images).float()
            if cfg.test_flip:
                logits = (logits + model(images.flip(3)).float()) / 2
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        sums += torch.stack(
            [
                F.cross_entropy(logits, targets, reduction="sum").double(),
                hit[:, 0].sum().double(),
                hit.any(dim=1).sum().double(),
                torch.tensor(float(targets.numel()), dtype=torch.float64, device=device),
            ]
        )
        if k:
            confusion += torch.bincount(targets * k + logits.argmax(1), minlength=k * k)
    if dist.is_initialized():
        dist.all_reduce(sums)
        if k:
            dist.all_reduce(confusion)
    loss, top1, top5, n = sums.tolist()
    if n == 0:
        raise ValueError("the test set holds no images: there is nothing to evaluate")
    out: dict[str, Any] = {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n,
                           "count": int(n)}  # fmt: skip
    if k:
        out["confusion"] = confusion.view(k, k).cpu()
    return out


def _test_metrics(
    cfg: TrainConfig, state: TrainState, model, loader, device, num_classes: int
) -> tuple[dict[str, float], torch.Tensor | None]:
    """``test_*`` metrics of the model (and ``ema_test_*`` of its EMA), with rank 0's buffers,
    and the model's (K, K) test confusion matrix (None above `CONFUSION_MAX_CLASSES`)."""
    _sync_buffers(state.model)
    k = num_classes if num_classes <= CONFUSION_MAX_CLASSES else None
    metrics = evaluate(model, loader, device, cfg, num_classes=k)
    confusion = metrics.pop("confusion", None)
    row = {f"test_{k}": v for k, v in metrics.items()}
    if state.ema is not None:
        ema_metrics = evaluate(state.ema.module, loader, device, cfg, "test (EMA)")
        row.update({f"ema_test_{k}": v for k, v in ema_metrics.items() if k != "count"})
    return row, confusion


def _sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics, class centres).

    DDP broadcasts buffers at the start of each forward, so after the last step every rank holds
    its own update; evaluating with rank 0's copy makes the sharded evaluation measure exactly
    the weights that are checkpointed.
    """
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# ----------------------------------------------------------------------------- the recipe
@dataclass
class _Setup:
    """What `train` builds before it claims the run folder: data, model, state."""

    classes: list[str]
    sampler: Any
    loader: Any
    test_loader: Any
    steps: int
    state: TrainState
    train_model: Any
    eval_model: Any


def _set_up(cfg: TrainConfig, resume_ckpt, device: torch.device, rank: int, world: int) -> _Setup:
    """Data, model and optimiser of ``cfg`` (and the checkpoint's state when resuming)."""
    train_set, test_set = build_datasets(cfg)
    if resume_ckpt is not None:
        check_classes(resume_ckpt["classes"], train_set.classes, f"--resume {cfg.resume}")
    sampler = build_sampler(cfg, fgdata.targets_of(train_set), rank, world)
    model = _place_model(build_model(cfg, len(train_set.classes)), cfg, device)
    state = create_train_state(cfg, model, device)
    if resume_ckpt is not None:
        load_train_state(state, resume_ckpt, rank, world)
    train_model, eval_model = _wrap_model(state.model, cfg, device)
    return _Setup(
        classes=list(train_set.classes),
        sampler=sampler,
        loader=build_train_loader(train_set, sampler, cfg, device),
        test_loader=build_eval_loader(test_set, cfg, rank, world, device),
        steps=_steps_per_epoch(sampler, cfg),
        state=state,
        train_model=train_model,
        eval_model=eval_model,
    )


def check_classes(trained: list[str], data: list[str], what: str) -> None:
    """A checkpoint's classes and a training split's must be the same names in the same order."""
    if list(trained) == list(data):
        return
    in_data, in_ckpt = set(data), set(trained)
    only_ckpt = [c for c in trained if c not in in_data]
    only_data = [c for c in data if c not in in_ckpt]
    detail = (f"only in the checkpoint: {only_ckpt[:3]}, only in the data: {only_data[:3]}"
              if only_ckpt or only_data else "the same names in another order")  # fmt: skip
    raise ValueError(
        f"{what}: the checkpoint was trained on {len(trained)} classes, the dataset has "
        f"{len(data)} classes that differ ({detail}); use the dataset it was trained on"
    )


def banner(cfg: TrainConfig, setup: _Setup) -> str:
    """The run in one line: model, weights, data, schedule."""
    if not cfg.pretrained:
        weights = "random init (--no-pretrained)"
    elif cfg.pretrained_file:
        weights = f"ImageNet weights from {cfg.pretrained_file} (--pretrained)"
    else:
        weights = "timm's ImageNet weights (--pretrained)"
    batch = (f"{cfg.batch_size} + {cfg.batch_size} partners" if cfg.arch == "pcanet"
             else f"{cfg.pk_classes} classes x {cfg.pk_images}")  # fmt: skip
    return (
        f"{cfg.arch} on {cfg.dataset} ({len(setup.classes)} classes) | backbone {cfg.backbone}, "
        f"{weights} | {cfg.image_size} px | batch {batch} | {cfg.epochs} epochs x "
        f"{setup.steps} steps, lr {cfg.lr:g}"
    )


def train(
    cfg: TrainConfig,
    resume_ckpt: dict[str, Any] | None = None,
    on_start: Any = None,
    resume_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or continue) training as configured; returns the final metrics.

    The data, model and optimiser are built before the run folder is claimed, so a bad data root
    or model option leaves no folder behind. ``on_start(run_dir)``, if given, is called once the
    run has started (folder claimed, before the first step). ``resume_path`` is the file
    ``resume_ckpt`` was read from (default ``cfg.resume``, else the run folder's last.pth): the
    run folder must belong to that checkpoint's run (`rundir.claim`).

    Returns a dict with "status" ("finished" or "interrupted"), "run_dir", "epoch" and the last
    test metrics ("test_top1", ...).
    """
    dev = init_distributed_device_so(device=resolve_device(cfg.device))
    device, rank, world = torch.device(dev["device"]), dev["global_rank"], dev["world_size"]
    random_seed(cfg.seed, rank)
    setup = _set_up(cfg, resume_ckpt, device, rank, world)
    resume = _resume_identity(cfg, resume_ckpt, resume_path)
    with _run_folder(cfg, device, world, resume) as (run_dir, lock):
        if lock is not None and resume is not None and not lock.same_run:
            setup.state.run_id = new_run_id()  # a branch into a new folder: a run of its own
        _print(banner(cfg, setup))
        for note in _start_notes(cfg, setup, resumed=resume is not None):
            _print(note)
        if on_start is not None:
            on_start(run_dir)
        result = _train_epochs(cfg, setup, device, run_dir, lock)
        if result["status"] == "finished":
            _print(final_summary(setup.state, run_dir))
        return {**result, "run_dir": str(run_dir)}


def _resume_identity(
    cfg: TrainConfig, ckpt: dict[str, Any] | None, path: str | Path | None
) -> rundir.RunIdentity | None:
    """The run a resumed checkpoint belongs to (None when not resuming); its file is ``path``,
    else ``cfg.resume``, else the run folder's last.pth."""
    if ckpt is None:
        return None
    if path is None and cfg.resume not in (None, "auto"):
        path = cfg.resume
    return rundir.RunIdentity.of(ckpt, path or Path(cfg.output) / (cfg.name or "") / "last.pth")


def _start_notes(cfg: TrainConfig, setup: _Setup, resumed: bool) -> list[str]:
    """Lines after the banner: where a resumed run continues (epochs counted from 1, as in the
    epoch lines) and a warning when CIN's batches hold no positive pair."""
    state, notes = setup.state, []
    if resumed and state.step:
        notes.append(f"resumed in epoch {state.epoch + 1} of {cfg.epochs}, after step "
                     f"{state.step} of {setup.steps}")  # fmt: skip
    elif resumed:
        notes.append(f"resumed after epoch {state.epoch} of {cfg.epochs}")
    if cfg.arch == "cin" and not setup.sampler.pairs_per_batch[0]:
        notes.append(f"warning: --pk-images {cfg.pk_images} gives no positive pairs (one image "
                     f"per class in a batch): CIN's contrastive loss then only pushes pairs "
                     f"apart and never pulls a class together, the flaw of the public "
                     f"reimplementation; use --pk-images 2 or more (the paper: 5)")  # fmt: skip
    return notes


def final_summary(state: TrainState, run_dir: Path) -> str:
    """The last line of a finished run: best test top-1, its epoch and what the folder holds."""
    tested = [row for row in state.history if "test_top1" in row]
    files = ", ".join(name for name in rundir.OUTPUTS if (run_dir / name).exists())
    epochs = f"{state.epoch} epoch{'s' if state.epoch != 1 else ''}"
    if not tested:
        return f"finished {epochs}; run folder {run_dir}: {files}"
    best = max(tested, key=lambda row: row["test_top1"])  # the first of equal ones
    return (
        f"finished {epochs}: best test top-1 {best['test_top1']:.2f} % (epoch "
        f"{int(best['epoch'])}, best.pth); run folder {run_dir}: {files}"
    )


def _train_epochs(
    cfg: TrainConfig, setup: _Setup, device, run_dir: Path, lock: rundir.RunLock | None
) -> dict[str, Any]:
    """The epochs of `train`, from where ``setup.state`` stands."""
    state, classes, sampler = setup.state, setup.classes, setup.sampler
    result: dict[str, Any] = {"status": "finished"}
    with _StopFlag() as stop:
        for epoch in range(state.epoch, cfg.epochs):
            t0 = time.time()
            state.scheduler.step(epoch)  # lr is a function of the epoch alone: exact on resume
            sampler.set_epoch(epoch, start_batch=state.step)
            if not train_one_epoch(
                cfg, state, setup.train_model, setup.loader, setup.steps, device, stop
            ):
                last = save_last(cfg, classes, state, run_dir)
                _first_checkpoint_written(lock)
                _print_stop(cfg, f"saved {last} in epoch {epoch + 1}, after step {state.step}; "
                                 f"continue with --resume {last}")  # fmt: skip
                return {**result, "status": "interrupted"}
            row = _end_of_epoch(cfg, setup, device, run_dir, epoch)
            row["epoch_time_s"] = time.time() - t0
            state.history.append(row)
            last = save_last(cfg, classes, state, run_dir)
            _first_checkpoint_written(lock)
            if _is_primary():
                log_epoch(state.history, run_dir, cfg.plots)
            result.update(row)
            if stop.agreed(device):
                _print_stop(cfg, f"saved {last} after epoch {epoch + 1}")
                return {**result, "status": "interrupted"}
    return {**result, "epoch": cfg.epochs, "best_top1": state.best_top1}


def _end_of_epoch(cfg: TrainConfig, setup: _Setup, device, run_dir: Path, epoch: int) -> dict:
    """Epoch ``epoch`` (0-based) has trained: its summary row; evaluates when due and writes
    best.pth on a new best test top-1."""
    state, classes = setup.state, setup.classes
    row = {"epoch": epoch + 1, "lr": state.optimizer.param_groups[0]["lr"]}
    row.update(_reduce_sums(state.partial_sums, device))
    state.epoch, state.step, state.partial_sums = epoch + 1, 0, {}
    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
        metrics, confusion = _test_metrics(
            cfg, state, setup.eval_model, setup.test_loader, device, len(classes)
        )
        row.update(metrics)
        if row["test_top1"] > state.best_top1:
            state.best_top1 = row["test_top1"]
            save_best(cfg, classes, state, run_dir, confusion)
    return row


def _print_stop(cfg: TrainConfig, what: str) -> None:
    # On a line of its own: a progress bar (stderr) or the terminal's ^C may hold the cursor.
    _print(f"{chr(10) if cfg.progress else ''}stop requested: {what}")


# ----------------------------------------------------------------------------- entry point
def main(
    arch: str | None = None,
    argv: list[str] | None = None,
    prog: str | None = None,
    on_start: Any = None,
) -> dict[str, Any]:
    """Command-line entry point of the training command (see ``--help``); returns `train`'s
    result. ``arch`` fixes the architecture (None: ``--arch``, the config's, the checkpoint's, or
    pcanet). Errors are raised (`fgattn.cli.train` turns user errors into one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = resolve_config(arch, argv, prog=prog)
    ckpt = path = None
    if cfg.resume:
        cfg, ckpt, path = _resume(cfg, arch, argv, prog)
        if ckpt is not None and _finished(cfg, ckpt, path):
            return {"status": "finished", "run_dir": str(path.parent), "epoch": ckpt["epoch"],
                    "best_top1": ckpt.get("best_top1")}  # fmt: skip
    try:
        return train(cfg, ckpt, on_start, resume_path=path)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# What decides a model's weights: a resumed run must build the checkpoint's model.
MODEL_FIELDS = ("arch", "backbone", "model_kwargs")


def _resume(cfg: TrainConfig, arch: str | None, argv: list[str], prog: str | None):
    """(config, checkpoint, its path) of ``--resume``: the checkpoint's saved config under the
    command's flags, in the checkpoint's run directory unless ``--output`` / ``--name`` say
    otherwise. ``--resume auto`` with no last.pth yet starts afresh (checkpoint None). Flags that
    would build another model than the checkpoint's (`MODEL_FIELDS`) are an error."""
    path = Path(cfg.resume)
    if cfg.resume == "auto":
        if not cfg.name:
            raise ValueError("--resume auto needs --name (the run to continue), got no name")
        path = Path(cfg.output) / cfg.name / "last.pth"
    if not path.is_file():
        if cfg.resume != "auto":
            raise FileNotFoundError(f"--resume checkpoint file not found: {path}")
        return cfg, None, None
    ckpt = load_checkpoint(path)
    if "optimizer" not in ckpt:
        raise ValueError(
            f"--resume {path}: this checkpoint holds weights only (best.pth does); resume from "
            f"{path.parent / 'last.pth'}"
        )
    if ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(
            f"--resume {path}: not a training checkpoint of this version (wanted format "
            f"{CKPT_FORMAT!r}, got {ckpt.get('format')!r})"
        )
    cfg = resolve_config(arch, argv, base=ckpt["config"], prog=prog)
    for key in MODEL_FIELDS:
        trained, asked = ckpt["config"].get(key), getattr(cfg, key)
        if trained != asked and not (key == "model_kwargs" and not trained and not asked):
            flag = "--" + key.replace("_", "-")
            raise ValueError(
                f"--resume {path}: the checkpoint was trained with {key} {trained!r}, this "
                f"command asks for {asked!r}; drop {flag} (the checkpoint's is used), or start "
                f"a new run without --resume"
            )
    if cfg.epochs < ckpt["epoch"]:
        raise ValueError(
            f"--epochs {cfg.epochs} is below the {ckpt['epoch']} epochs {path} has trained: "
            f"nothing to do; pass --epochs above {ckpt['epoch']} to train further"
        )
    given = {arg.split("=")[0] for arg in argv}
    if "--output" not in given:
        cfg.output = str(path.parent.parent)
    if "--name" not in given:
        cfg.name = path.parent.name
    return cfg, ckpt, path


def _finished(cfg: TrainConfig, ckpt: dict[str, Any], path: Path) -> bool:
    """Whether the resumed run has already trained ``cfg.epochs`` epochs: ``--resume auto`` then
    says so and does nothing (a requeued job), an explicit ``--resume PATH`` is an error."""
    if ckpt["epoch"] < cfg.epochs or ckpt.get("step"):
        return False
    best = ckpt.get("best_top1")
    what = f"this run has finished its {ckpt['epoch']} epochs" + (
        f" (best test top-1 {best:.2f} %)" if isinstance(best, float) and best >= 0 else ""
    )
    fix = f"pass --epochs above {ckpt['epoch']} to train further"
    if cfg.resume != "auto":
        raise ValueError(f"--resume {path}: {what}; nothing to do: {fix}")
    _print(f"--resume auto: {path}: {what}; nothing to do ({fix})")
    return True
