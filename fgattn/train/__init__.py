"""Reference training for CIN and PCA-Net: the engine behind examples/train_*.py.

``python examples/train_pcanet.py`` (or ``train_cin.py``) with no arguments trains on the built-in
synthetic dataset; ``--dataset cub --data-root PATH`` runs the paper recipe. See `engine` for the
run directory layout, resume and distributed behaviour, and `config` for every option.
"""

from .checkpoint import load_checkpoint, save_atomic
from .config import RECIPES, SYNTHETIC_PRESETS, TrainConfig, resolve_config
from .engine import (
    build_dataset,
    build_datasets,
    build_eval_loader,
    build_model,
    evaluate,
    main,
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
    "main",
    "resolve_config",
    "save_atomic",
    "train",
]
