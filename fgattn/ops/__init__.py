"""Implementations of the channel-bilinear softmax ops, one module per backend.

`reference` is the plain PyTorch ground truth; faster backends are tested against it.
Callers go through `fgattn.functional`, which picks a backend in `fgattn.backend`.
"""
