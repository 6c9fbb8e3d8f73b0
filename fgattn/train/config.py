"""Training configuration: the papers' recipes, the synthetic quick-start preset, YAML and CLI.

Resolution order (later wins): the paper recipe of the architecture -> the synthetic preset (only
when the dataset is "synthetic", the default) -> ``--config`` YAML -> command-line flags. With
``--resume`` the checkpoint's saved config replaces the first three. The resolved config is written
to ``<run dir>/config.yaml`` and stored in every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timm.utils import ParseKwargs

from ..data import DATASETS

ARCHS = ("pcanet", "cin")
AMP_MODES = ("none", "bf16", "fp16")
CHOICES = {
    "dataset": DATASETS,
    "amp": AMP_MODES,
    "annotation_level": ("variant", "family", "manufacturer"),
}


@dataclass
class TrainConfig:
    """Every option of the training scripts (each is also a ``--kebab-case`` flag)."""

    # Model
    arch: str = "pcanet"  # "pcanet" or "cin"
    backbone: str = "resnet50"  # any timm model name
    pretrained: bool = True  # timm ImageNet weights for the backbone (the papers start from them)
    model_kwargs: dict = field(default_factory=dict)  # extra fgattn.create_model(...) arguments
    # Data
    dataset: str = "synthetic"  # synthetic | cub | aircraft | cars | imagefolder
    data_root: str | None = None
    image_size: int = 448  # crop side (paper: 448)
    resize: int = 512  # shorter side before the crop (paper: 512)
    hflip: float = 0.5
    annotation_level: str = "variant"  # FGVC-Aircraft: variant | family | manufacturer
    crop_banner: bool = False  # FGVC-Aircraft: cut the 20-px copyright banner
    synthetic_classes: int = 16
    synthetic_train_per_class: int = 64
    synthetic_test_per_class: int = 16
    workers: int = 4
    # Batches: PCA-Net takes batch_size anchors + as many partners; CIN takes P classes × K images
    batch_size: int = 16  # PCA-Net: anchors per process (the batch holds 2x this many images)
    pk_classes: int = 4  # CIN: P
    pk_images: int = 5  # CIN: K
    eval_batch_size: int = 32
    max_steps_per_epoch: int | None = None  # cap on training steps per epoch (quick tests)
    # Optimisation
    epochs: int = 180
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    lr_step: int = 2  # StepLR: multiply the lr by lr_gamma every lr_step epochs
    lr_gamma: float = 0.9
    grad_clip: float | None = None
    ema: bool = False  # keep an exponential moving average of the weights (timm ModelEmaV3)
    ema_decay: float = 0.9998
    # Hardware
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "none"  # none | bf16 | fp16 (autocast; fp16 uses a GradScaler)
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    sync_bn: bool = False  # SyncBatchNorm under DistributedDataParallel
    find_unused_parameters: bool = False
    # Evaluation
    test_flip: bool = False  # average logits of the image and its mirror at evaluation
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    # Run
    seed: int = 0
    output: str = "runs"  # runs are written to <output>/<name>/
    name: str | None = None  # default: <arch>-<dataset>-<backbone>-<timestamp>
    resume: str | None = None  # checkpoint to continue from ("auto": <output>/<name>/last.pth)
    overwrite: bool = False  # replace the run already in <output>/<name>/ (else that is an error)
    progress: bool = True  # tqdm progress bars on rank 0
    plots: bool = True  # loss / accuracy PNGs (needs matplotlib)

    def validate(self) -> TrainConfig:
        checks = [
            ("arch", self.arch in ARCHS, f"one of {ARCHS}"),
            ("dataset", self.dataset in DATASETS, f"one of {DATASETS}"),
            ("amp", self.amp in AMP_MODES, f"one of {AMP_MODES}"),
            ("device", self.device.split(":")[0] in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
            ("epochs", self.epochs >= 1, "an integer >= 1"),
            ("lr", self.lr > 0, "a positive float"),
            ("lr_step", self.lr_step >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("image_size", self.image_size >= 16, "an integer >= 16"),
            ("resize", self.resize >= self.image_size, f">= image_size ({self.image_size})"),
            ("eval_every", self.eval_every >= 1, "an integer >= 1"),
            ("workers", self.workers >= 0, "an integer >= 0"),
        ]
        for name, ok, wanted in checks:
            if not ok:
                raise ValueError(f"config {name} must be {wanted}, got {getattr(self, name)!r}")
        if self.dataset != "synthetic" and not self.data_root:
            raise ValueError(
                f"config data_root must name the folder of dataset {self.dataset!r}, got None "
                "(pass --data-root PATH, or omit --dataset to train on the built-in synthetic set)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Paper recipes. PCA-Net (Zhang et al., ICME 2021, §4.1): SGD, lr 0.01 decayed ×0.9 every 2 epochs,
# momentum 0.9, weight decay 1e-5, 16 images + 16 partners, 180 epochs, 448 crops of 512 resizes.
# CIN (Gao et al., AAAI 2020, §4.1): SGD lr 0.001 halved every 20 epochs, weight decay 2e-4, batches
# of 4 classes × 5 images, 100 epochs (α = 2, β = 0.5 are the model's loss weights).
RECIPES: dict[str, dict[str, Any]] = {
    "pcanet": dict(
        arch="pcanet", lr=0.01, lr_step=2, lr_gamma=0.9, momentum=0.9, weight_decay=1e-5,
        batch_size=16, epochs=180,
    ),
    "cin": dict(
        arch="cin", lr=0.001, lr_step=20, lr_gamma=0.5, momentum=0.9, weight_decay=2e-4,
        pk_classes=4, pk_images=5, epochs=100,
    ),
}  # fmt: skip

# Quick start on the built-in synthetic set: a small backbone from scratch at 64 px, so a CPU shows
# learning within minutes. The paper recipes (ImageNet-pretrained ResNet-50 at 448 px) are for the
# real datasets.
SYNTHETIC_PRESETS: dict[str, dict[str, Any]] = {
    "pcanet": dict(
        backbone="resnet10t", pretrained=False, image_size=64, resize=72, epochs=6, lr=0.05,
        lr_step=2, lr_gamma=0.7, batch_size=16, workers=0, eval_batch_size=64, grad_clip=5.0,
        synthetic_train_per_class=48,
    ),
    # From scratch, CIN's contrastive term starts near 30 and its η is unbounded: without
    # clipping the first steps can diverge, so the preset clips gradients.
    "cin": dict(
        backbone="resnet10t", pretrained=False, image_size=64, resize=72, epochs=15, lr=0.02,
        lr_step=5, lr_gamma=0.7, pk_classes=4, pk_images=5, workers=0, eval_batch_size=64,
        grad_clip=5.0, synthetic_train_per_class=48,
    ),
}  # fmt: skip


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _base_type(tp) -> tuple[type, bool]:
    """(underlying type, optional?) of a field annotation such as ``int | None``."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def _coerce(name: str, value: Any) -> Any:
    """Check / convert one YAML or checkpoint value to the field's type."""
    tp, optional = _base_type(_field_types()[name])
    if value is None:
        if optional:
            return None
        raise ValueError(f"config {name} must be a {tp.__name__}, got None")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is dict and isinstance(value, dict):
        return dict(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ValueError(f"config {name} must be a {tp.__name__}, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml  # a dependency of timm

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of options, got {type(data)}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"config file {path} has unknown option(s) {unknown}; known options: {sorted(known)}"
        )
    return {k: _coerce(k, v) for k, v in data.items()}


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def _parse_optional(tp):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else tp(text)

    parse.__name__ = tp.__name__
    return parse


def build_parser(arch: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=f"Train {'PCA-Net' if arch == 'pcanet' else 'CIN'} (fgattn). Defaults: the "
        "paper recipe on a real dataset; the synthetic quick-start preset when no --dataset is "
        "given. Flags override --config, which overrides the defaults.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only flags actually given override anything
    )
    parser.add_argument("--config", help="YAML file of options (keys as in config.yaml)")
    defaults = {**TrainConfig().to_dict(), **RECIPES[arch]}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "arch":
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, optional = _base_type(_field_types()[f.name])
        shown = f"(recipe: {defaults[f.name]!r})"
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=shown)
        elif tp is dict:
            parser.add_argument(flag, nargs="*", action=ParseKwargs, help=f"key=value ... {shown}")
        else:
            parse = _parse_optional(tp) if optional else tp
            parser.add_argument(flag, type=parse, choices=CHOICES.get(f.name), help=shown)
    return parser


def resolve_config(
    arch: str, argv: list[str] | None = None, base: dict[str, Any] | None = None
) -> TrainConfig:
    """The config of a run: recipe -> synthetic preset -> YAML -> flags (see the module docstring).

    ``base`` (a saved config, e.g. from a checkpoint) replaces recipe and preset when given.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    args = vars(build_parser(arch).parse_args(argv))
    yaml_values = load_yaml(args.pop("config")) if "config" in args else {}
    flags = {k: v for k, v in args.items()}
    values = {**TrainConfig().to_dict(), **RECIPES[arch]}
    if base is not None:
        values.update({k: _coerce(k, v) for k, v in base.items() if k in values})
    else:
        dataset = flags.get("dataset", yaml_values.get("dataset", values["dataset"]))
        if dataset == "synthetic":
            values.update(SYNTHETIC_PRESETS[arch])
    values.update(yaml_values)
    values.update(flags)
    values["arch"] = arch
    return TrainConfig(**values).validate()
