"""Datasets, paired-batch samplers and transforms for fine-grained training.

- `SyntheticFineGrained`: a built-in, deterministic dataset whose classes differ only in small
  parts; the default when no dataset is named, so training runs offline out of the box.
- `CUB200`, `FGVCAircraft`, `StanfordCars`, `ImageFolder` and `create_dataset(name, root, split)`.
- `PairBatchSampler` (PCA-Net: N anchors + N same-class partners) and `PKBatchSampler` (CIN: P
  classes × K images split into pairs); both yield batches where image i pairs with image i + N.
- `create_transform(train, image_size, resize)`: Resize + RandomCrop + flip / Resize + CenterCrop.
"""

from .datasets import (
    CUB200,
    DATASETS,
    FGVCAircraft,
    ImageFolder,
    ImageReadError,
    StanfordCars,
    align_classes,
    create_dataset,
    load_image,
)
from .samplers import (
    PairBatchSampler,
    PKBatchSampler,
    SeededDataset,
    ShardedEvalSampler,
    targets_of,
)
from .synthetic import SyntheticFineGrained, class_attributes, preview_grid
from .transforms import create_transform

__all__ = [
    "CUB200",
    "DATASETS",
    "FGVCAircraft",
    "ImageFolder",
    "ImageReadError",
    "PKBatchSampler",
    "PairBatchSampler",
    "SeededDataset",
    "ShardedEvalSampler",
    "StanfordCars",
    "SyntheticFineGrained",
    "align_classes",
    "class_attributes",
    "create_dataset",
    "create_transform",
    "load_image",
    "preview_grid",
    "targets_of",
]
