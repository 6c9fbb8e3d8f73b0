"""Reference training for CIN and PCA-Net: the engine behind ``fgattn-train`` (`fgattn.cli.train`,
also ``python -m fgattn.train``) and examples/train_*.py.

``fgattn-train`` with no arguments trains PCA-Net on the built-in synthetic dataset
(``--arch cin`` for CIN); ``--recipe pcanet-cub --data-root PATH`` (or ``--dataset cub
--data-root PATH``) runs the paper recipe. See `engine` for the run directory layout, resume and
distributed behaviour, and `config` for every option.
"""

from .checkpoint import load_checkpoint, load_weights, save_atomic
from .config import RECIPES, SYNTHETIC_PRESETS, TrainConfig, resolve_config
from .engine import (
    build_dataset,
    build_datasets,
    build_eval_loader,
    build_model,
    evaluate,
    main,
    resolve_device,
    train,
)

__all__ = [
    "RECIPES",
    "SYNTHETIC_PRESETS",
    "TrainConfig",
    "build_dataset",
    "build_datasets",
    "build_eval_loader",
    "build_model",
    "evaluate",
    "load_checkpoint",
    "load_weights",
    "main",
    "resolve_config",
    "resolve_device",
    "save_atomic",
    "train",
]
