"""What the choice of implementation depends on: a `Call` (one op call, without its data), and the
facts an implementation checks before it takes one (`Limits`, the device's memory).

Everything here is plain Python on sizes and flags. The few facts read from the device are
`torch.compiler.assume_constant_result`, so under torch.compile they are read once at trace time
and the whole model still compiles with fullgraph=True.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

OPS = ("self", "cross", "contrastive")
ATTENTION = ("self", "cross")
HALF = (torch.float16, torch.bfloat16)
FP32 = (torch.float32,)
FLOATS = (*HALF, *FP32)
ALL_FLOATS = (*FLOATS, torch.float64)


class Call(NamedTuple):
    """One op call, without its data."""

    op: str  # "self" (q = k = v), "cross" or "contrastive"
    device_type: str  # "cuda", "cpu", ...
    device: str  # "cuda:0", "cpu", ...
    capability: tuple[int, int]  # CUDA compute capability; (0, 0) off CUDA
    dtype: torch.dtype  # the dtype the op computes in (inputs promoted)
    batch: int  # B (symbolic while torch.export traces a dynamic batch: never compared)
    channels: int  # C: the softmax runs over C x C
    length: int  # L: the reduction axis of the logits (H·W)
    value_length: int  # Lv: the width of v (L except for CoAttention's [F1 | F2])
    grad: bool  # a backward will follow

    def __str__(self) -> str:
        return (
            f"{self.op} attention, {self.dtype} on {self.device}, B={self.batch} "
            f"C={self.channels} L={self.length} Lv={self.value_length}, grad={self.grad}"
        )


def describe(op: str, *tensors: torch.Tensor) -> Call:
    """The `Call` for `op` on (B, C, L) tensors (contrastive: x_a, x_b, eta)."""
    x = tensors[0]
    data = tensors[:2] if op == "contrastive" else tensors
    dtype = x.dtype
    for t in data[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return Call(
        op=op,
        device_type=x.device.type,
        device=str(x.device),
        capability=capability(str(x.device)) if x.device.type == "cuda" else (0, 0),
        dtype=dtype,
        batch=x.shape[0],
        channels=x.shape[1],
        length=x.shape[2],
        value_length=data[-1].shape[2],
        grad=torch.is_grad_enabled() and any(t.requires_grad for t in tensors),
    )


def is_empty(call: Call) -> bool:
    """Whether the call's inputs hold no element. Each size is compared with 0 on its own: a
    dynamic size (torch.compile, torch.export) is known to be ≥ 1 there, so no guard is added,
    where min(B, C, L) == 0 would compare the sizes with each other (a guard B <= L). A function,
    not a property: dynamo of torch 2.8 cannot branch on a NamedTuple property's SymBool."""
    return call.batch == 0 or call.channels == 0 or call.length == 0 or call.value_length == 0


def _names(dtypes) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)


@dataclasses.dataclass(frozen=True)
class Limits:
    """The devices, dtypes and row lengths an implementation takes; `refusal` says why a call is
    outside them. Only the reference takes empty inputs (there is nothing to be fast at)."""

    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    max_length: int | None = None  # the longest L it holds
    min_length: int | None = None  # the shortest L it is meant for
    empty: bool = False

    def refusal(self, call: Call) -> str | None:
        if call.device_type not in self.devices:
            return f"it runs on {'/'.join(self.devices)}, not {call.device_type}"
        if call.dtype not in self.dtypes:
            return f"it runs {_names(self.dtypes)}, not {_names([call.dtype])}"
        if self.max_length is not None and call.length > self.max_length:
            return f"it takes L <= {self.max_length}, got L = {call.length}"
        if self.min_length is not None and call.length < self.min_length:
            return f"it is meant for L >= {self.min_length}, got L = {call.length}"
        if not self.empty and is_empty(call):
            return "the inputs are empty (only 'reference' runs those)"
        return None

    def __str__(self) -> str:
        lengths = f", L <= {self.max_length}" if self.max_length else ""
        lengths += f", L >= {self.min_length}" if self.min_length else ""
        return f"{'/'.join(self.devices)} in {_names(self.dtypes)}{lengths}"


# ----------------------------------------------------------------------------------------------
# Facts read from the device


@torch.compiler.assume_constant_result
def capability(device: str) -> tuple[int, int]:
    return torch.cuda.get_device_capability(torch.device(device))


@torch.compiler.assume_constant_result
def free_bytes(device: str) -> int:
    """Free memory on a CUDA device: the driver's free plus what torch's cache holds unused."""
    dev = torch.device(device)
    free, _ = torch.cuda.mem_get_info(dev)
    return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)


def matrices_bytes(call: Call) -> int:
    """Bytes of the (B, C, C) matrices an implementation that builds them needs: logits and
    softmax in fp32 (fp64 for fp64), and with a gradient two more of each; the contrastive op has
    two of everything."""
    per_matrix = call.batch * call.channels**2 * max(4, call.dtype.itemsize)
    count = (4 if call.grad else 2) * (2 if call.op == "contrastive" else 1)
    return count * per_matrix


def matrices_fit(call: Call) -> bool:
    """Whether those matrices fit in free memory (always off the GPU)."""
    return call.device_type != "cuda" or matrices_bytes(call) < free_bytes(call.device)
