"""Batch samplers that build the paired batches CIN and PCA-Net train on.

Both models take a batch of 2N images in which image i is paired with image i + N (first half:
"A" images, second half: their partners "B"). The samplers here produce exactly that layout.

- `PairBatchSampler` (PCA-Net): N anchors, each followed N places later by a different image of
  the same class. Every pair is positive. Each epoch uses every image once as an anchor.
- `PKBatchSampler` (CIN): P classes × K images per batch, split into P·K/2 pairs. Each class gives
  ⌊K/2⌋ positive pairs (same class, different images); the images left over (one per class when K
  is odd) are paired across classes, so they are negative pairs. CIN's 4 × 5 gives 8 positive and 2
  negative pairs per batch. Positive pairs are guaranteed by construction (the public CIN
  reimplementation's contiguous layout never pairs two images of the same class).

Shared behaviour:
- Reproducible: the batches of epoch e depend only on (seed, e). Call `set_epoch(e)` before each
  epoch, as with `torch.utils.data.DistributedSampler`.
- DistributedDataParallel: every rank builds the same global list of batches and takes every
  world_size-th one (rank r gets batches r, r + W, ...), truncated so all ranks run the same
  number of steps. So ranks never draw the same batch, and one epoch covers about as much data
  whatever the number of processes.
- Exact resume: `set_epoch(e, start_batch=b)` skips the first b of this rank's batches once.
- With ``with_seeds=True`` every element is ``(index, sample_seed)`` instead of ``index``; wrap the
  dataset in `SeededDataset` so that random augmentation of each drawn sample is a function of
  (seed, epoch, position) alone — independent of dataloader workers, and so exactly resumable.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from .seeding import mix_seed


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
        )
    return rank, world_size


def targets_of(dataset) -> list[int]:
    """The integer label of every item of ``dataset`` (``.targets`` or a torchvision equivalent)."""
    for attr in ("targets", "_labels"):
        if hasattr(dataset, attr):
            return [int(t) for t in getattr(dataset, attr)]
    if hasattr(dataset, "_samples"):
        return [int(t) for _, t in dataset._samples]
    if isinstance(dataset, torch.utils.data.Subset):
        parent = targets_of(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    raise ValueError(
        f"dataset must expose its labels as a `.targets` list, got {type(dataset).__name__} "
        "without one"
    )


class _PairedBatchSampler(torch.utils.data.Sampler):
    """Common epoch / rank / resume / seeding logic; subclasses build one epoch's global batches."""

    def __init__(
        self,
        targets: Sequence[int],
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        with_seeds: bool = False,
    ) -> None:
        self.targets = [int(t) for t in targets]
        if not self.targets:
            raise ValueError("targets must be a non-empty sequence of class labels, got []")
        self.rank, self.world_size = _dist_info(rank, world_size)
        self.seed = int(seed)
        self.with_seeds = with_seeds
        self.epoch = 0
        self.start_batch = 0
        self.by_class: dict[int, list[int]] = {}
        for i, t in enumerate(self.targets):
            self.by_class.setdefault(t, []).append(i)
        self.classes = sorted(self.by_class)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select epoch ``epoch``'s batches; skip this rank's first ``start_batch`` (for resume)."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def _global_batches(self, rng: random.Random) -> list[list[int]]:
        raise NotImplementedError

    def _num_global_batches(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch (ignoring ``start_batch``)."""
        return self._num_global_batches() // self.world_size

    def __iter__(self) -> Iterator[list]:
        rng = random.Random(mix_seed(self.seed, self.epoch))
        batches = self._global_batches(rng)
        n = len(self)
        mine = batches[self.rank :: self.world_size][:n]
        start, self.start_batch = self.start_batch, 0
        for b in range(start, n):
            batch_no = b * self.world_size + self.rank  # position in the global list
            if self.with_seeds:
                seeds = [mix_seed(self.seed, self.epoch, batch_no, j) for j in range(len(mine[b]))]
                yield list(zip(mine[b], seeds, strict=True))
            else:
                yield list(mine[b])


class PairBatchSampler(_PairedBatchSampler):
    """PCA-Net batches: ``batch_size`` anchors followed by one same-class partner each.

    Layout of a yielded batch of 2N indices: ``[a_0, ..., a_{N-1}, p_0, ..., p_{N-1}]`` with
    ``label(p_i) == label(a_i)`` and ``p_i != a_i`` whenever the class has two or more images
    (a class with a single image is paired with itself).

    Args:
        targets: label of every dataset item.
        batch_size: N, the number of anchors (the batch holds 2N images; paper: 16 + 16).
        seed, rank, world_size, with_seeds: see the module docstring.

    An epoch has ``len(targets) // N`` global batches (each image is an anchor at most once).
    """

    def __init__(
        self,
        targets: Sequence[int],
        batch_size: int = 16,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        with_seeds: bool = False,
    ) -> None:
        super().__init__(targets, seed, rank, world_size, with_seeds)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1 anchors, got {batch_size!r}")
        self.batch_size = int(batch_size)
        if len(self) == 0:
            raise ValueError(
                f"batch_size={batch_size} anchors × world_size={self.world_size} needs at least "
                f"{self.batch_size * self.world_size} images, the dataset has {len(self.targets)}"
            )

    def _num_global_batches(self) -> int:
        return len(self.targets) // self.batch_size

    def _global_batches(self, rng: random.Random) -> list[list[int]]:
        order = list(range(len(self.targets)))
        rng.shuffle(order)
        batches = []
        for b in range(self._num_global_batches()):
            anchors = order[b * self.batch_size : (b + 1) * self.batch_size]
            partners = []
            for a in anchors:
                pool = self.by_class[self.targets[a]]
                if len(pool) == 1:
                    partners.append(a)
                    continue
                p = pool[rng.randrange(len(pool) - 1)]
                partners.append(p if p != a else pool[-1])  # uniform over the others
            batches.append(anchors + partners)
        return batches


class PKBatchSampler(_PairedBatchSampler):
    """CIN batches: P classes × K images, laid out as P·K/2 pairs (i pairs with i + P·K/2).

    Per batch: P distinct classes, K distinct images of each (with repetition only when a class has
    fewer than K images). Within each class the images are paired two by two: ⌊K/2⌋ positive pairs
    per class. The K mod 2 leftover images per class are paired across classes in round-robin
    order, so these pairs are always negative. Pairs are then shuffled and each pair's order is
    randomised; the first elements form the first half of the batch, the second elements the
    second half.

    Args:
        targets: label of every dataset item.
        num_classes: P, classes per batch (paper: 4); must not exceed the classes present.
        num_images: K, images per class (paper: 5). P·K must be even.
        num_batches: global batches per epoch; default ``len(targets) // (P·K)``.
        seed, rank, world_size, with_seeds: see the module docstring.

    Classes are visited in a shuffled cycle so every class appears equally often, and the images of
    each class in a shuffled cycle so every image appears about equally often.
    """

    def __init__(
        self,
        targets: Sequence[int],
        num_classes: int = 4,
        num_images: int = 5,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        with_seeds: bool = False,
    ) -> None:
        super().__init__(targets, seed, rank, world_size, with_seeds)
        p, k = int(num_classes), int(num_images)
        if not 1 <= p <= len(self.classes):
            raise ValueError(
                f"num_classes (P) must be in [1, {len(self.classes)}] (the classes in the "
                f"dataset), got {num_classes!r}"
            )
        if k < 1 or (p * k) % 2:
            raise ValueError(
                f"num_images (K) must be >= 1 with P·K even so the batch splits into pairs, "
                f"got P={p}, K={k}"
            )
        if k % 2 and p < 2:
            raise ValueError(f"odd K={k} needs P >= 2 to pair the leftover images, got P={p}")
        self.p, self.k = p, k
        self.num_batches = (
            int(num_batches) if num_batches is not None else max(1, len(self.targets) // (p * k))
        )
        if len(self) == 0:
            raise ValueError(
                f"num_batches={self.num_batches} is smaller than world_size={self.world_size}"
            )

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    @property
    def pairs_per_batch(self) -> tuple[int, int]:
        """(positive, negative) pairs in every batch."""
        pos = self.p * (self.k // 2)
        return pos, self.p * self.k // 2 - pos

    def _num_global_batches(self) -> int:
        return self.num_batches

    def _global_batches(self, rng: random.Random) -> list[list[int]]:
        class_cycle: list[int] = []
        image_cycles: dict[int, list[int]] = {c: [] for c in self.classes}

        def next_images(c: int) -> list[int]:
            pool = self.by_class[c]
            if len(pool) < self.k:  # too few images: repeat whole shuffled passes
                reps = math.ceil(self.k / len(pool))
                return [i for _ in range(reps) for i in rng.sample(pool, len(pool))][: self.k]
            cycle, out = image_cycles[c], []
            while len(out) < self.k:
                if not cycle:  # new pass over the class, minus what this batch already holds
                    cycle.extend(i for i in rng.sample(pool, len(pool)) if i not in out)
                out.append(cycle.pop())
            return out

        batches = []
        for _ in range(self.num_batches):
            chosen: list[int] = []
            while len(chosen) < self.p:
                if not class_cycle:
                    fresh = rng.sample(self.classes, len(self.classes))
                    class_cycle.extend(c for c in fresh if c not in chosen)
                chosen.append(class_cycle.pop())
            images = {c: next_images(c) for c in chosen}
            pairs = [
                (images[c][2 * j], images[c][2 * j + 1]) for c in chosen for j in range(self.k // 2)
            ]
            leftovers = [images[c][-1] for c in chosen] if self.k % 2 else []
            pairs += [(leftovers[2 * j], leftovers[2 * j + 1]) for j in range(len(leftovers) // 2)]
            rng.shuffle(pairs)
            pairs = [pair if rng.random() < 0.5 else pair[::-1] for pair in pairs]
            batches.append([a for a, _ in pairs] + [b for _, b in pairs])
        return batches


class ShardedEvalSampler(torch.utils.data.Sampler):
    """Evaluation sampler for exact distributed metrics: rank r gets indices r, r + W, ...

    Unlike `DistributedSampler` it never pads with duplicates, so ranks may get one item more or
    less than each other; sum counts across ranks (all_reduce) to get exact metrics.
    """

    def __init__(self, length: int, rank: int | None = None, world_size: int | None = None):
        self.length = int(length)
        self.rank, self.world_size = _dist_info(rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return max(0, math.ceil((self.length - self.rank) / self.world_size))


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset so ``dataset[(index, seed)]`` runs its random transforms under ``seed``.

    The global torch and Python RNG states are saved and restored around the call, so the wrapper
    neither depends on nor disturbs the state of the process it runs in (main process or a
    dataloader worker). Plain integer indices pass through unseeded.
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, item):
        if not isinstance(item, tuple):
            return self.dataset[item]
        index, seed = item
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)


__all__ = [
    "PKBatchSampler",
    "PairBatchSampler",
    "SeededDataset",
    "ShardedEvalSampler",
    "targets_of",
]
