"""Seeds derived from integers, shared by the synthetic dataset and the paired-batch samplers."""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """SplitMix64 hash of a tuple of ints -> a 63-bit seed (stable across runs and platforms)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1
