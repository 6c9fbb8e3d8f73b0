"""Training configuration: the papers' recipes, the synthetic quick-start preset, YAML and CLI.

Resolution order (later wins): the paper recipe of the architecture -> the synthetic preset (only
when the dataset is "synthetic", the default) -> ``--recipe`` (a packaged YAML,
``fgattn/recipes/<arch>-<dataset>.yaml``) -> ``--config`` (a YAML path or a packaged name) ->
command-line flags. With ``--resume`` the checkpoint's saved config replaces the first two. The
resolved config is written to ``<run dir>/config.yaml`` and stored in every checkpoint.

``--help`` shows, for each flag, the value this run would use without it: the flags that decide
those values (``--arch``, ``--dataset``, ``--recipe``, ``--config``) are read first.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timm.utils import ParseKwargs

from .. import _args
from ..data import DATASETS

ARCHS = ("pcanet", "cin")
RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"  # package data: <arch>-<dataset>.yaml
AMP_MODES = ("none", "bf16", "fp16")
CHOICES = {
    "dataset": DATASETS,
    "amp": AMP_MODES,
    "annotation_level": ("variant", "family", "manufacturer"),
}


# Ranges of the numeric options, checked by `TrainConfig.validate` (and so for flags, YAML and
# checkpoints alike). Real numbers: (low, high, low excluded); all must be finite.
REAL_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "lr": (0.0, None, True),
    "momentum": (0.0, 1.0, False),
    "weight_decay": (0.0, None, False),
    "lr_gamma": (0.0, 1.0, True),
    "grad_clip": (0.0, None, True),
    "ema_decay": (0.0, 1.0, False),
    "hflip": (0.0, 1.0, False),
}
INT_MINIMA: dict[str, int] = {
    "epochs": 1,
    "lr_step": 1,
    "batch_size": 1,
    "pk_classes": 1,
    "pk_images": 1,
    "eval_batch_size": 1,
    "max_steps_per_epoch": 1,
    "image_size": 16,
    "resize": 16,
    "synthetic_classes": 1,
    "synthetic_train_per_class": 1,
    "synthetic_test_per_class": 1,
    "workers": 0,
    "eval_every": 1,
    "seed": 0,
}
OPTIONAL = ("grad_clip", "max_steps_per_epoch")  # None: no clipping, full epochs
MAX_SEED = 2**32 - 1 - 1024  # numpy seeds every rank with seed + rank, below 2**32


def flag_of(name: str) -> str:
    """The command-line flag of option ``name`` ("lr_gamma" -> "--lr-gamma")."""
    return "--" + name.replace("_", "-")


def _check_device(device: object) -> None:
    """auto, cpu, cuda or cuda:N (whether that device exists is checked when the run starts)."""
    kind, _, index = str(device).partition(":")
    if (
        not isinstance(device, str)
        or kind not in ("auto", "cpu", "cuda")
        or (index and (kind != "cuda" or not index.isdigit()))
    ):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def _check_pk(p: int, k: int) -> None:
    """CIN's P × K batch must split into pairs (image i with image i + P·K/2)."""
    if (p * k) % 2:
        raise ValueError(
            f"--pk-classes {p} x --pk-images {k} = {p * k} images per batch must be even: CIN "
            f"pairs image i with image i + P·K/2; make --pk-classes or --pk-images even"
        )


@dataclass
class TrainConfig:
    """Every option of the training command (each is also a ``--kebab-case`` flag; `HELP` says
    what each one does)."""

    # Model
    arch: str = "pcanet"
    backbone: str = "resnet50"
    pretrained: bool = True
    pretrained_file: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    # Data
    dataset: str = "synthetic"
    data_root: str | None = None
    image_size: int = 448
    resize: int = 512
    hflip: float = 0.5
    annotation_level: str = "variant"
    crop_banner: bool = False
    synthetic_classes: int = 16
    synthetic_train_per_class: int = 64
    synthetic_test_per_class: int = 16
    workers: int = 4
    # Batches: PCA-Net takes batch_size anchors + as many partners; CIN takes P classes × K images
    batch_size: int = 16
    pk_classes: int = 4
    pk_images: int = 5
    eval_batch_size: int = 32
    max_steps_per_epoch: int | None = None
    # Optimisation
    epochs: int = 180
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    lr_step: int = 2
    lr_gamma: float = 0.9
    grad_clip: float | None = None
    ema: bool = False
    ema_decay: float = 0.9998
    # Hardware
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    find_unused_parameters: bool = False
    # Evaluation
    test_flip: bool = False
    eval_every: int = 1
    # Run
    seed: int = 0
    output: str = "runs"
    name: str | None = None
    resume: str | None = None
    overwrite: bool = False
    progress: bool = True
    plots: bool = True

    def validate(self) -> TrainConfig:
        """Check every option's type and range; errors name the option's flag (``--lr``), what it
        got and what it wanted."""
        for name, choices in (("arch", ARCHS), *CHOICES.items()):
            _args.choice(getattr(self, name), flag_of(name), choices)
        for name, (low, high, low_open) in REAL_RANGES.items():
            value = getattr(self, name)
            if value is not None or name not in OPTIONAL:
                _args.real(value, flag_of(name), low=low, high=high, low_open=low_open)
        for name, minimum in INT_MINIMA.items():
            value = getattr(self, name)
            if value is not None or name not in OPTIONAL:
                _args.integer(value, flag_of(name), minimum=minimum)
        if self.seed > MAX_SEED:
            raise ValueError(f"--seed must be an int in [0, {MAX_SEED}], got {self.seed}")
        if self.resize < self.image_size:
            raise ValueError(
                f"--resize must be >= --image-size ({self.image_size}): the crop is cut from the "
                f"resized image, got --resize {self.resize}"
            )
        _check_device(self.device)
        if self.arch == "cin":
            _check_pk(self.pk_classes, self.pk_images)
        if self.dataset != "synthetic" and not self.data_root:
            raise ValueError(
                f"--data-root must name the folder of dataset {self.dataset!r}, got None "
                "(pass --data-root PATH, or omit --dataset to train on the built-in synthetic set)"
            )
        if self.pretrained_file and not self.pretrained:
            raise ValueError(
                f"--pretrained-file is {self.pretrained_file!r} but pretrained is False: "
                "add --pretrained to load it, or drop --pretrained-file"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# One line per option: the ``--help`` text of its flag (a test checks that every field has one).
HELP: dict[str, str] = {
    "arch": "model to train: pcanet (PCA-Net, ICME 2021) or cin (CIN, AAAI 2020)",
    "backbone": "timm model name of the backbone, optionally with a weight tag (resnet50.tv_in1k)",
    "pretrained": "start the backbone from timm's ImageNet weights (downloaded once, then cached)",
    "pretrained_file": "load the backbone's ImageNet weights from this local file (offline use; "
    "timm's pretrained_cfg_overlay=dict(file=...)); needs --pretrained",
    "model_kwargs": "extra fgattn.create_model arguments as key=value, e.g. bilinear_dim=128",
    "dataset": "synthetic (built in, no download) | cub | aircraft | cars | imagefolder",
    "data_root": "folder of the dataset (cub: the folder holding CUB_200_2011/)",
    "image_size": "side of the square training crop and test centre crop, in pixels",
    "resize": "shorter image side before cropping, in pixels (>= --image-size)",
    "hflip": "probability of a horizontal flip in training",
    "annotation_level": "FGVC-Aircraft labels: variant | family | manufacturer",
    "crop_banner": "FGVC-Aircraft: cut the 20-px copyright banner off each image",
    "synthetic_classes": "synthetic set: number of classes",
    "synthetic_train_per_class": "synthetic set: training images per class",
    "synthetic_test_per_class": "synthetic set: test images per class",
    "workers": "dataloader worker processes (0: load in the main process)",
    "batch_size": "PCA-Net: anchor images per process; each gets a same-class partner (2x images)",
    "pk_classes": "CIN: classes per batch (P of P x K)",
    "pk_images": "CIN: images per class in a batch (K of P x K)",
    "eval_batch_size": "images per batch at evaluation",
    "max_steps_per_epoch": "stop each epoch after this many steps (quick tests; None: full epochs)",
    "epochs": "number of training epochs",
    "lr": "SGD learning rate at epoch 0",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay (on every parameter, as the papers)",
    "lr_step": "multiply the learning rate by --lr-gamma every this many epochs",
    "lr_gamma": "learning-rate decay factor of each step",
    "grad_clip": "clip the gradient norm to this value (None: no clipping)",
    "ema": "also keep and evaluate an exponential moving average of the weights (timm ModelEmaV3)",
    "ema_decay": "decay of the weight EMA",
    "device": "auto (CUDA if available, else CPU) | cpu | cuda | cuda:N",
    "amp": "mixed precision: none | bf16 | fp16 (fp16 adds a GradScaler)",
    "channels_last": "run the model in channels_last memory format",
    "compile": "torch.compile the model",
    "sync_bn": "SyncBatchNorm across processes under torchrun (CUDA only)",
    "find_unused_parameters": "DistributedDataParallel's find_unused_parameters",
    "test_flip": "at evaluation, average the logits of each image and its mirror image",
    "eval_every": "evaluate on the test split every this many epochs (and after the last)",
    "seed": "random seed of the data order, augmentation and initialisation",
    "output": "parent folder of the run folders",
    "name": "run folder name under --output (None: <arch>-<dataset>-<backbone>-<timestamp>)",
    "resume": "continue from this last.pth (auto: <output>/<name>/last.pth if it exists)",
    "overwrite": "replace the run already in <output>/<name>/ (otherwise that is an error)",
    "progress": "show progress bars (where the output is not a terminal: a line a minute)",
    "plots": "write loss.png and accuracy.png after each epoch (needs matplotlib)",
}


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


# ----------------------------------------------------------------------------- packaged recipes
def recipe_names() -> list[str]:
    """Names of the paper recipes shipped in ``fgattn/recipes/`` ("pcanet-cub", ...)."""
    return sorted(p.name.removesuffix(".yaml") for p in RECIPE_DIR.iterdir() if p.suffix == ".yaml")


def find_config(name_or_path: str, flag: str = "--config") -> Path:
    """The YAML file of ``--config`` (a path or a packaged recipe name) or ``--recipe`` (a name)."""
    packaged = RECIPE_DIR / f"{name_or_path}.yaml"
    if flag == "--config" and Path(name_or_path).is_file():
        return Path(name_or_path)
    if packaged.is_file():
        return packaged
    what = "a YAML file or a packaged recipe" if flag == "--config" else "a packaged recipe"
    raise FileNotFoundError(
        f"{flag} {name_or_path!r} is not {what}; packaged recipes: {', '.join(recipe_names())}"
    )


# ----------------------------------------------------------------------------- command line
METAVARS = {"data_root": "PATH", "pretrained_file": "PATH", "output": "PATH", "resume": "PATH"}
ARCH_TITLES = {"pcanet": "PCA-Net (Zhang et al., ICME 2021)", "cin": "CIN (Gao et al., AAAI 2020)"}
EPILOG = """\
examples:
  fgattn-train                                   PCA-Net on the built-in synthetic set (CPU is fine)
  fgattn-train --arch cin                        CIN on the synthetic set
  fgattn-train --recipe pcanet-cub --data-root data/cub        the paper recipe on CUB-200-2011
  fgattn-train --arch cin --dataset cars --data-root data --amp bf16
  fgattn-train --resume runs/<run>/last.pth      continue a run exactly where it stopped
  fgattn-train --dataset cub --help              the values a CUB run would use

Order (later wins): the paper recipe of --arch, the synthetic quick-start preset (when the
dataset is synthetic), --recipe, --config, the flags.
Packaged recipes: {recipes}."""


def _preparse(argv: list[str], prog: str | None) -> argparse.Namespace:
    """The flags that decide the other flags' defaults: --arch, --dataset, --recipe, --config."""
    pre = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    for flag in ("--arch", "--dataset", "--recipe", "--config"):
        pre.add_argument(flag)
    return pre.parse_known_args(argv)[0]


def _pick_arch(script: str | None, flag: str | None, config: str | None, ckpt: str | None) -> str:
    """The architecture: the script's or --arch, else the config's, the checkpoint's, pcanet."""
    for source, arch in (("this script", script), ("--arch", flag), ("the config", config)):
        if arch is not None and arch not in ARCHS:
            raise ValueError(f"{source}: arch must be one of {ARCHS}, got {arch!r}")
    if script and flag and script != flag:
        raise ValueError(
            f"--arch {flag}: this script trains {script!r}; run fgattn-train --arch {flag}"
        )
    chosen = script or flag
    if chosen and config and config != chosen:
        raise ValueError(
            f"the --recipe / --config given is for arch {config!r}, this run trains {chosen!r}; "
            f"choose a {chosen} recipe ({', '.join(n for n in recipe_names() if chosen in n)})"
        )
    return chosen or config or ckpt or "pcanet"


def _defaults(
    arch: str, dataset: str, yaml_values: dict[str, Any], base: dict[str, Any] | None
) -> dict[str, Any]:
    """Every option's value before the flags: recipe -> preset (or ``base``) -> YAML."""
    values = {**TrainConfig().to_dict(), **RECIPES[arch]}
    if base is not None:
        values.update({k: _coerce(k, v) for k, v in base.items() if k in values})
    elif dataset == "synthetic":
        values.update(SYNTHETIC_PRESETS[arch])
    values.update(yaml_values)
    values.update(arch=arch, dataset=dataset)
    return values


def _source(values: dict[str, Any], base: Any, sources: list[str]) -> str:
    what = f"{values['backbone']}, {values['image_size']} px, {values['epochs']} epochs"
    if base is not None:
        origin = "the checkpoint's saved config"
    elif values["dataset"] == "synthetic":
        origin = f"the synthetic quick-start preset ({what})"
    else:
        origin = f"the paper recipe on {values['dataset']} ({what})"
    return ", then ".join([origin, *sources])


def build_parser(
    arch: str,
    defaults: dict[str, Any] | None = None,
    prog: str | None = None,
    source: str = "",
    fixed_arch: bool = False,
) -> argparse.ArgumentParser:
    """The training command's parser; each flag's help ends with the value the run will use
    (``defaults``: by default the synthetic quick start of ``arch``). ``fixed_arch``: a script
    that trains ``arch`` only (examples/train_cin.py), whose help does not offer ``--arch``."""
    if defaults is None:
        defaults = _defaults(arch, "synthetic", {}, None)
        source = _source(defaults, None, [])
    arch_usage = "" if fixed_arch else "[--arch {pcanet,cin}] "
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"%(prog)s {arch_usage}[--recipe NAME] [--config NAME|PATH] [--FLAG VALUE ...]",
        description=textwrap.fill(
            f"Train {ARCH_TITLES[arch]} with fgattn. [Values in brackets] are what this run will "
            f"use unless the flag is given: {source}.",
            width=88,
        ),
        epilog=EPILOG.format(recipes=", ".join(recipe_names())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only flags actually given override anything
        allow_abbrev=False,  # --epoch is an error, not --epochs
    )
    arch_help = argparse.SUPPRESS if fixed_arch else f"{HELP['arch']} [{arch}]"
    parser.add_argument("--arch", choices=ARCHS, help=arch_help)  # a script's own arch: accepted
    parser.add_argument("--recipe", metavar="NAME", help="a packaged paper recipe (see below)")
    parser.add_argument(
        "--config", metavar="NAME|PATH", help="YAML file of options (keys as in config.yaml) or "
        "a packaged recipe name"
    )  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "arch":
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, optional = _base_type(_field_types()[f.name])
        shown = f"{HELP[f.name]} [{_shown(defaults[f.name])}]".replace("%", "%%")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=shown)
        elif tp is dict:
            parser.add_argument(flag, nargs="*", action=ParseKwargs, metavar="KEY=VALUE",
                                help=shown)  # fmt: skip
        else:
            parse = _parse_optional(tp) if optional else tp
            metavar = None if f.name in CHOICES else METAVARS.get(f.name, tp.__name__.upper())
            parser.add_argument(flag, type=parse, choices=CHOICES.get(f.name), metavar=metavar,
                                help=shown)  # fmt: skip
    return parser


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={v!r}" for k, v in value.items()) or "none"
    return str(value)


def resolve_config(
    arch: str | None = None,
    argv: list[str] | None = None,
    base: dict[str, Any] | None = None,
    prog: str | None = None,
) -> TrainConfig:
    """The config of a run: recipe -> synthetic preset -> --recipe -> --config -> flags (see the
    module docstring).

    ``arch`` fixes the architecture (a script that trains one model); None takes ``--arch``, else
    the YAML's, else ``base``'s, else "pcanet". ``base`` (a saved config, e.g. from a checkpoint)
    replaces recipe and preset when given.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = _preparse(argv, prog)
    yaml_values: dict[str, Any] = {}
    sources = []
    for flag, value in (("--recipe", pre.recipe), ("--config", pre.config)):
        if value is not None:
            yaml_values.update(load_yaml(find_config(value, flag)))
            sources.append(f"{flag} {value}")
    fixed_arch = arch is not None
    arch = _pick_arch(arch, pre.arch, yaml_values.get("arch"), (base or {}).get("arch"))
    dataset = pre.dataset or yaml_values.get("dataset") or (base or {}).get("dataset", "synthetic")
    defaults = _defaults(arch, dataset, yaml_values, base)
    source = _source(defaults, base, sources)
    args = vars(build_parser(arch, defaults, prog, source, fixed_arch).parse_args(argv))
    for key in ("arch", "recipe", "config", "debug"):
        args.pop(key, None)
    return TrainConfig(**{**defaults, **args}).validate()
