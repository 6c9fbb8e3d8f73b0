"""Checkpoints that are atomic, verified and load with ``torch.load(weights_only=True)``, plus RNG
capture/restore.

A checkpoint dict is written with a SHA-256 of its content (every tensor's bytes, every value)
under ``"sha256"``; `load_checkpoint` recomputes it, so flipped bytes are an error, not silently
altered weights.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

DIGEST_KEY = "sha256"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip archive


def content_digest(obj: Any) -> str:
    """SHA-256 over a checkpoint's content: tensors by dtype, shape and bytes; containers and
    plain values by structure and repr (tuples and lists alike: weights_only loads lists)."""
    digest = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            digest.update(f"D{len(x)}".encode())
            for key, value in x.items():
                feed(key)
                feed(value)
        elif isinstance(x, (list, tuple)):
            digest.update(f"S{len(x)}".encode())
            for value in x:
                feed(value)
        else:
            digest.update(f"V{x!r}".encode())

    feed(obj)
    return digest.hexdigest()


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write `obj` to a temporary file in the same folder, fsync, then ``os.replace``; the file
    gets the mode any other file of the run gets (the umask's), not the temporary file's 0600.

    os.replace is atomic on POSIX and Windows, so a kill at any moment leaves either the previous
    complete file or the new complete file at ``path``, never a truncated one. A dict is stored
    with its `content_digest` under ``"sha256"``. A full disk is an OSError that says so; the
    previous file stays intact.
    """
    path = Path(path)
    if isinstance(obj, dict):
        content = {k: v for k, v in obj.items() if k != DIGEST_KEY}  # a stale digest goes
        obj = {**content, DIGEST_KEY: content_digest(content)}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            if hasattr(os, "fchmod"):  # mkstemp's 0600 -> what open() would give
                os.fchmod(f.fileno(), _file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC, f"disk full while writing {path}; the previous file there is intact"
            ) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _file_mode() -> int:
    """The mode a new file gets from ``open()`` under this process's umask (0644 for 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed `save_atomic` left in `folder`; returns them."""
    stale = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path, map_location="cpu") -> dict[str, Any]:
    """Load a training checkpoint safely (``weights_only=True``: tensors and plain containers)
    and verify its SHA-256; every way a file can be wrong is a ValueError that says which."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): an interrupted copy?")
    if head != ZIP_MAGIC:
        raise ValueError(
            f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive; this file "
            f"starts with {head!r})"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's message may advise weights_only=False: not for our files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only load failed" in reason.lower():
            reason = "it holds Python objects other than tensors and plain containers"
        raise ValueError(
            f"cannot read checkpoint {path}: truncated, corrupted or not written by fgattn "
            f"({reason})"
        ) from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(
            f"checkpoint {path} is not an fgattn training checkpoint (wanted a dict with a "
            f"'model' state dict, got {type(ckpt).__name__})"
        )
    _verify(ckpt, path)
    return ckpt


def _verify(ckpt: dict[str, Any], path: Path) -> None:
    stored = ckpt.pop(DIGEST_KEY, None)
    if stored is None:
        return  # written before checkpoints carried a digest
    if stored != content_digest(ckpt):
        raise ValueError(
            f"checkpoint {path} is corrupted: its content does not match the SHA-256 stored in "
            f"it (bytes changed on disk or in transfer); use another checkpoint"
        )


def load_weights(model: torch.nn.Module, weights: dict[str, Any], source: str) -> None:
    """``model.load_state_dict(weights)`` (strict), where weights that do not fit the model are a
    one-paragraph ValueError saying which tensors differ instead of torch's list of mismatches.

    Args:
        model: the model the checkpoint's config builds.
        weights: its state dict.
        source: the checkpoint, as the message names it ("checkpoint runs/x/best.pth").
    """
    own = model.state_dict()
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and torch.is_tensor(v) and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if not (shapes or missing or unexpected):
        model.load_state_dict(weights)
        return
    parts = [
        f"{len(found)} {what} (first {found[0]})"
        for found, what in ((shapes, "tensors of other shapes"), (missing, "missing tensors"),
                            (unexpected, "unexpected tensors"))
        if found
    ]  # fmt: skip
    raise ValueError(
        f"{source} does not fit the model built from its config: {'; '.join(parts)}; "
        f"it was written for another arch, backbone, class count or model_kwargs (or by another "
        f"version of fgattn)"
    )


def rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / Python RNG states, in weights_only-loadable types."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    # weights_only loading returns lists where pickling saw tuples; random wants the tuple shape.
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
