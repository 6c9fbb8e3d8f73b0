"""Run folders: one run per folder, never two at once, never replaced without being asked.

`claim` is called by the process that writes a run (rank 0 under DDP) before anything is written:

- a folder that already holds a run's files is refused unless this run resumes that same run
  (``--resume`` of a checkpoint whose run id is the folder's, not behind the folder's last.pth)
  or the user asked to replace it (``--overwrite``);
- ``--overwrite`` moves the previous run's files into ``<run>/.previous-run/``; they are deleted
  once the new run has written its first checkpoint (`RunLock.commit`) and put back if it fails
  before that (`RunLock.restore`, or the next `claim` after a kill);
- a folder another live process is writing to is refused: the claim holds an exclusive ``flock``
  on ``<run>/.lock`` until it is released, and the kernel drops it if the process dies (kill -9);
- temporary files a killed checkpoint write left behind are deleted.

A run is identified by the ``run_id`` its checkpoints carry (`RunIdentity`); the folder's owner is
the run of its last.pth (else best.pth).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import remove_stale_temp_files

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the folder checks still apply
    fcntl = None

# What a run writes into its folder (engine and train/logging.py). A folder holds a run once it has
# any of OUTPUTS; config.yaml alone is a start that failed before its first epoch.
OUTPUTS = (
    "summary.csv",
    "last.pth",
    "best.pth",
    "loss.png",
    "accuracy.png",
    "confusion.csv",
    "confusion_worst.png",
)
CHECKPOINTS = ("last.pth", "best.pth")
RUN_FILES = ("config.yaml", *OUTPUTS)
LOCK_FILE = ".lock"
PREVIOUS = ".previous-run"  # an --overwrite'n run's files until the new run's first checkpoint


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message says how to proceed."""


@dataclass(frozen=True)
class RunIdentity:
    """Which run a checkpoint belongs to and where it stands (``epoch`` epochs and ``step`` steps
    of the next one done). ``run_id`` is None for checkpoints written before runs had ids."""

    path: Path
    run_id: str | None
    name: str | None
    epoch: int
    step: int

    @classmethod
    def of(cls, ckpt: dict, path: str | Path) -> RunIdentity:
        """The identity of a loaded checkpoint dict read from ``path``."""
        config = ckpt.get("config") or {}
        return cls(
            path=Path(path),
            run_id=ckpt.get("run_id"),
            name=config.get("name"),
            epoch=int(ckpt.get("epoch", 0)),
            step=int(ckpt.get("step", 0) or 0),
        )

    def describe(self) -> str:
        ident = f"id {self.run_id}" if self.run_id else "no run id"
        where = f"epoch {self.epoch}" + (f", step {self.step}" if self.step else "")
        return f"run {self.name!r} ({ident}, at {where})"


def read_identity(path: str | Path) -> RunIdentity | None:
    """The identity of the checkpoint at ``path`` (memory-mapped: no tensor is read), or None
    when there is none or it cannot be read."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: its owner is unknown
        return None
    return RunIdentity.of(ckpt, path) if isinstance(ckpt, dict) else None


def folder_owner(run_dir: Path) -> RunIdentity | None:
    """The run whose checkpoint (last.pth, else best.pth) is in ``run_dir``."""
    for name in CHECKPOINTS:
        owner = read_identity(run_dir / name)
        if owner is not None:
            return owner
    return None


class RunLock:
    """An exclusive lock on a run folder, held until `release` (or the process ends).

    ``replaced`` names the previous run's files an ``--overwrite`` moved to ``<run>/.previous-run``
    (empty when nothing was replaced); `commit` deletes them, `restore` puts them back.
    ``same_run``: the resumed checkpoint continues the run of this folder (its own folder, or one
    whose run it is); otherwise a resumed run is a new run, a branch of the checkpoint's.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.replaced: list[str] = []
        self.same_run = False
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self._fd, 200).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            self._fd = None
            raise RunFolderError(
                f"run folder {run_dir} is in use by another run ({holder}); wait for it to "
                f"finish or choose another --name"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())

    @property
    def previous(self) -> Path:
        return self.run_dir / PREVIOUS

    def commit(self) -> list[str]:
        """Delete the replaced run's files (call once this run has a checkpoint); returns their
        names (empty if there were none or they are already gone)."""
        removed, self.replaced = self.replaced, []
        if removed:
            shutil.rmtree(self.previous, ignore_errors=True)
        return removed

    def restore(self) -> list[str]:
        """Put the replaced run's files back (this run failed before its first checkpoint)."""
        restored, self.replaced = self.replaced, []
        if restored:
            _restore_previous(self.run_dir)
        return restored

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(
    run_dir: str | Path, *, resume: RunIdentity | None = None, overwrite: bool = False
) -> RunLock:
    """Create or take over ``run_dir`` for this process's run; see the module docstring.

    Args:
        run_dir: the run folder.
        resume: the checkpoint this run continues, if it resumes.
        overwrite: replace a run already in the folder (its files are kept until `RunLock.commit`).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    try:
        _recover_previous(run_dir)
        existing = [name for name in RUN_FILES if (run_dir / name).exists()]
        lock.same_run = resume is not None and resume.path.parent.resolve() == run_dir.resolve()
        if set(existing) & set(OUTPUTS):
            same_run = resume is not None and _check_owner(run_dir, resume, overwrite)
            lock.same_run = same_run
            if resume is None and not overwrite:
                raise RunFolderError(
                    f"run folder {run_dir} already holds a run ({', '.join(existing)}); continue "
                    f"it with --resume {run_dir / 'last.pth'}, replace it with --overwrite, or "
                    f"choose another --name"
                )
            if overwrite and not same_run:
                lock.replaced = _stash(run_dir, existing)
        remove_stale_temp_files(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_owner(run_dir: Path, resume: RunIdentity, overwrite: bool) -> bool:
    """Whether ``resume`` continues the run in ``run_dir`` as it stands; if not, an error unless
    ``overwrite`` (another run's folder, or a later state of the same run, would be replaced)."""
    owner = folder_owner(run_dir)
    own_last = resume.path.resolve() == (run_dir / "last.pth").resolve()
    same = own_last or (
        owner is not None and owner.run_id is not None and owner.run_id == resume.run_id
    )
    behind = (
        not own_last
        and owner is not None
        and ((owner.epoch, owner.step) > (resume.epoch, resume.step))
    )
    if (same and not behind) or overwrite:
        return same and not behind
    if not same:
        who = owner.describe() if owner is not None else "a run without a readable checkpoint"
        raise RunFolderError(
            f"run folder {run_dir} belongs to {who}, and --resume {resume.path} is a checkpoint "
            f"of {resume.describe()}: resuming there would replace that run's files; continue "
            f"in a new folder with --name NEW_NAME, or replace the other run with --overwrite"
        )
    raise RunFolderError(
        f"run folder {run_dir} holds a later state of this run (last.pth at epoch {owner.epoch}, "
        f"step {owner.step}) than --resume {resume.path} (epoch {resume.epoch}, step "
        f"{resume.step}); resuming there would replace it: continue in a new folder with --name "
        f"NEW_NAME, resume from {run_dir / 'last.pth'}, or replace it with --overwrite"
    )


def _stash(run_dir: Path, names: list[str]) -> list[str]:
    """Move ``names`` of ``run_dir`` into its `PREVIOUS` folder; returns them."""
    previous = run_dir / PREVIOUS
    previous.mkdir()
    for name in names:
        os.replace(run_dir / name, previous / name)
    return list(names)


def _restore_previous(run_dir: Path) -> None:
    """Move the stashed files back, over what the failed run wrote, and drop the stash folder."""
    previous = run_dir / PREVIOUS
    for name in RUN_FILES:
        if (previous / name).exists():
            os.replace(previous / name, run_dir / name)
        else:
            (run_dir / name).unlink(missing_ok=True)  # the failed run's, the old run had none
    shutil.rmtree(previous, ignore_errors=True)


def _recover_previous(run_dir: Path) -> None:
    """After a replacing run was killed: its stash is obsolete once it wrote a checkpoint, else
    the previous run comes back."""
    if not (run_dir / PREVIOUS).is_dir():
        return
    if any((run_dir / name).exists() for name in CHECKPOINTS):
        shutil.rmtree(run_dir / PREVIOUS, ignore_errors=True)
    else:
        _restore_previous(run_dir)


def remove_failed_start(run_dir: str | Path) -> bool:
    """Remove a run folder that holds only what a start writes (config.yaml, the lock, temporary
    files): the run failed before its first output. A folder with any output, or with files of
    the user's, is left as it is. Returns whether the folder was removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or any((run_dir / name).exists() for name in OUTPUTS):
        return False
    for name in ("config.yaml", LOCK_FILE):
        (run_dir / name).unlink(missing_ok=True)
    remove_stale_temp_files(run_dir)
    try:
        run_dir.rmdir()  # only if nothing else is left
    except OSError:
        return False
    return True
