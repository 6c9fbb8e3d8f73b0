"""Input checks shared by the functional API and the layers.

Every check raises a ValueError that names the argument, the shape it got and the shape it wanted
(a TypeError where the argument is not a tensor at all).
"""

from __future__ import annotations

import torch
from einops import rearrange


def check_tensor(x: object, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_float(x: torch.Tensor, name: str) -> None:
    check_tensor(x, name)
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype} with shape {tuple(x.shape)}"
        )


def to_bcl(x: torch.Tensor, name: str) -> torch.Tensor:
    """(B, C, L) or (B, C, H, W) -> (B, C, L), without copying where a view suffices."""
    check_float(x, name)
    if x.dim() == 3:
        return x
    if x.dim() == 4:
        return rearrange(x, "b c h w -> b c (h w)")
    raise ValueError(
        f"{name} must have shape (B, C, L) or (B, C, H, W), got {x.dim()}-D shape {tuple(x.shape)}"
    )


def like_layout(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(B, C, L) result -> the rank, spatial shape and memory format of `ref`."""
    if ref.dim() == 3:
        return out
    out = rearrange(out, "b c (h w) -> b c h w", h=ref.shape[2], w=ref.shape[3])
    if not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def check_same(
    a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str, dims: tuple[int, ...], what: str
) -> None:
    """Raise unless a and b agree on `dims` (indices into (B, C, L))."""
    if any(a.shape[d] != b.shape[d] for d in dims):
        want = ", ".join(("B", "C", "L")[d] for d in dims)
        raise ValueError(
            f"{b_name} must match {a_name} in {what} ({want}): {a_name} has shape "
            f"{tuple(a.shape)}, {b_name} has shape {tuple(b.shape)}"
        )


def check_image_batch(x: torch.Tensor, name: str, channels: int | None = None) -> None:
    """A float (B, C, H, W) tensor with C, H, W >= 1, and C == ``channels`` when given."""
    check_float(x, name)
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{name} must have {channels} channels, got shape {tuple(x.shape)} "
            f"(wanted (B, {channels}, H, W))"
        )
    if min(x.shape[1:]) < 1:
        raise ValueError(
            f"{name} must have at least one channel and position (C, H, W >= 1), got shape "
            f"{tuple(x.shape)}"
        )


def check_same_device(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    """Raise unless a and b are on one device."""
    if a.device != b.device:
        raise ValueError(
            f"{b_name} must be on the device of {a_name} ({a.device}), got device {b.device}; "
            f"move one of them (.to(device))"
        )


def check_module_input(x: torch.Tensor, name: str, module: torch.nn.Module, dtype=True) -> None:
    """x on the device of ``module``'s floating-point weights and, with ``dtype`` and outside
    ``torch.autocast``, of their dtype (a convolution or linear layer needs both)."""
    for weight in module.parameters():  # a loop: torch 2.8's dynamo cannot trace next(..., None)
        if weight.is_floating_point():
            break
    else:
        return
    what = type(module).__name__
    if x.device != weight.device:
        raise ValueError(
            f"{name} is on device {x.device}, the {what}'s weights on {weight.device}; move the "
            f"input or the module (module.to({str(x.device)!r}))"
        )
    if dtype and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"{name} has dtype {x.dtype}, the {what}'s weights {weight.dtype}; convert the input "
            f"(x.to({weight.dtype})) or the module (module.to({x.dtype})), or run under "
            f"torch.autocast"
        )


def split_pairs(x: torch.Tensor, name: str = "x") -> tuple[torch.Tensor, torch.Tensor]:
    """Split a batch laid out as [A_1..A_N, B_1..B_N] into its halves (A_i pairs with B_i)."""
    if x.shape[0] % 2:
        raise ValueError(
            f"{name} must hold an even number of images to form pairs (first half paired with "
            f"second half), got batch size {x.shape[0]} in shape {tuple(x.shape)}"
        )
    return x.chunk(2, dim=0)
