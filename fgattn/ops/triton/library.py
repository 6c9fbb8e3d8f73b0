"""What every Triton kernel family's launchers share: where the kernels run, input preparation, and
the registration of a family's ops with `torch.library` (`custom_op_pair`).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
import triton


@torch.compiler.assume_constant_result
def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 when the kernels were
    defined: tests). Read eagerly under torch.compile (dispatch asks it at trace time)."""
    return bool(triton.knobs.runtime.interpret)


def devices() -> tuple[str, ...]:
    """The device types the kernels take: CUDA, and CPU under the interpreter."""
    return ("cuda", "cpu") if interpreting() else ("cuda",)


def check_device(*xs: torch.Tensor) -> None:
    if any(x.device.type != "cuda" for x in xs) and not interpreting():
        raise RuntimeError(
            "fgattn's Triton kernels need CUDA tensors; CPU tensors only run under the Triton "
            "interpreter (set TRITON_INTERPRET=1 before fgattn is imported)"
        )


def launcher(fn):
    """A launcher's decorator: its tensor arguments checked to be where the kernels run, and the
    kernels launched on the first one's GPU (Triton launches on the current device, which need
    not be the tensors')."""

    @functools.wraps(fn)
    def run(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        check_device(*tensors)
        x = tensors[0]
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            return fn(*args)

    return run


def tf32() -> bool:
    """Whether fp32 products may use TF32 (torch.backends.cuda.matmul.allow_tf32)."""
    return torch.backends.cuda.matmul.allow_tf32


def one_dtype(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """xs cast to their promoted dtype: a kernel takes one (callers cast the result back)."""
    common = functools.reduce(torch.promote_types, (x.dtype for x in xs))
    return tuple(x.to(common) for x in xs)


def gradient_buffers(xs, needs) -> list[torch.Tensor]:
    """A contiguous gradient buffer per input: uninitialised where a kernel will write it, zeros
    where `needs` says the gradient is not wanted (and no kernel computes it)."""
    return [
        torch.empty(x.shape, device=x.device, dtype=x.dtype)
        if need
        else torch.zeros(x.shape, device=x.device, dtype=x.dtype)
        for x, need in zip(xs, needs, strict=True)
    ]


def aligned(x: torch.Tensor, tiles: int, tile: int, width: int) -> torch.Tensor:
    """x (B, C, ≤ tiles·tile) as (B, C, tiles·width): each `tile`-wide column tile zero-padded to
    `width` (a multiple of 16), contiguous, so every row starts 16-byte aligned, as pipelined
    (cp.async) and TMA loads need. No copy where x already is that."""
    length = x.shape[2]
    if tiles == 1 and length == width and x.is_contiguous() and x.data_ptr() % 16 == 0:
        return x
    x = F.pad(x, (0, tiles * tile - length)).unflatten(2, (tiles, tile))
    return F.pad(x, (0, width - tile)).flatten(2).contiguous()


# ----------------------------------------------------------------------------------------------
# Custom ops


def custom_op_pair(
    name: str, inputs: tuple[str, ...], forward, backward, *, value: int = 0, stats: int = 1
):
    """Registers a kernel family's op and its backward, fgattn::{name}_fwd and fgattn::{name}_bwd,
    with their fakes and autograd, and returns (fwd, bwd).

        fwd(*inputs, float scale, bool tf32) -> (out, *stats)
        bwd(grad, *inputs, *stats, float scale, bool tf32, bool[] needs) -> a gradient per input

    `forward` and `backward` run the kernels on real tensors with those arguments. out is
    (B, C, Lv) in the dtype and width of `inputs[value]`; each of the `stats` tensors is (B, 2, C)
    fp32, the [max, log Σ] of one softmax's rows, which the backward reuses. `needs` says which
    inputs want a gradient (autograd's needs_input_grad): `backward` skips the work of the others
    and returns zeros for them. The ops are opaque to torch.compile (the fakes check the shapes
    and give them); autograd saves the inputs and the statistics and calls bwd, so the backward
    is an op of its own too.
    """
    n = len(inputs)
    tensors = ", ".join(f"Tensor {arg}" for arg in inputs)
    saved = ", ".join(f"Tensor stats{i}" for i in range(stats))
    grads = "Tensor" if n == 1 else f"({', '.join(['Tensor'] * n)})"
    fwd = torch.library.custom_op(
        f"fgattn::{name}_fwd", forward, mutates_args=(),
        schema=f"({tensors}, float scale, bool tf32) -> ({', '.join(['Tensor'] * (1 + stats))})",
    )  # fmt: skip
    flags = "float scale, bool tf32, bool[] needs"
    bwd = torch.library.custom_op(
        f"fgattn::{name}_bwd", backward, mutates_args=(),
        schema=f"(Tensor grad, {tensors}, {saved}, {flags}) -> {grads}",
    )  # fmt: skip

    @fwd.register_fake
    def _(*args):
        x, like = args[0], args[value]
        _check_fake_inputs(inputs, args[:n])
        row_stats = (
            x.new_empty((x.shape[0], 2, x.shape[1]), dtype=torch.float32) for _ in range(stats)
        )
        return like.new_empty((*x.shape[:2], like.shape[2])), *row_stats

    @bwd.register_fake
    def _(grad, *args):
        _check_fake_inputs(inputs, args[:n])
        like = args[value]
        torch._check(
            grad.shape == (*like.shape[:2], like.shape[2]),
            lambda: (
                f"{name}_bwd: grad of shape {tuple(grad.shape)} for an output of "
                f"{tuple(like.shape)}"
            ),
        )
        out = tuple(torch.empty_like(x) for x in args[:n])
        return out if n > 1 else out[0]

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n], *output[1:])
        ctx.scale, ctx.tf32 = inputs[n:]

    def grad(ctx, grad_out, *_grad_stats):
        needs = list(ctx.needs_input_grad[:n])
        out = bwd(grad_out, *ctx.saved_tensors, ctx.scale, ctx.tf32, needs)
        out = out if n > 1 else (out,)
        return *(g if need else None for g, need in zip(out, needs, strict=True)), None, None

    fwd.register_autograd(grad, setup_context=setup)
    bwd.register_autograd(_no_second_derivative(name), setup_context=_no_context)
    return fwd, bwd


def _no_context(ctx, inputs, output) -> None:
    pass


def _no_second_derivative(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"fgattn: fgattn::{name} has no second derivative (its backward kernels are not "
            "differentiable); for a double backward run the ops with "
            "fgattn.backends.use_backend('reference')"
        )

    return backward


def _check_fake_inputs(names: tuple[str, ...], xs) -> None:
    """The shapes every family's ops take: (B, C, L) tensors agreeing in B and C (q and k, x_a
    and x_b also in L), and a (B,) eta."""
    first = xs[0]
    torch._check(first.dim() == 3, lambda: f"{names[0]} must be (B, C, L), got {first.shape}")
    for name, x in zip(names[1:], xs[1:], strict=True):
        if name == "eta":
            ok = x.shape == first.shape[:1]
        elif name in ("k", "x_b"):
            ok = x.shape == first.shape
        else:
            ok = x.dim() == 3 and x.shape[:2] == first.shape[:2]
        message = f"{name} of shape {tuple(x.shape)} for {names[0]} of {tuple(first.shape)}"
        torch._check(ok, lambda message=message: message)
