"""Run folders: one run per folder, never two at once, never replaced without being asked.

`claim` is called by the process that writes a run (rank 0 under DDP) before anything is written:

- a folder that already holds another run's files is refused unless the run resumes from it
  (``--resume``) or the user asked to replace it (``--overwrite``, which deletes those files);
- a folder another live process is writing to is refused: the claim holds an exclusive ``flock``
  on ``<run>/.lock`` until it is released, and the kernel drops it if the process dies (kill -9);
- temporary files a killed checkpoint write left behind are deleted.
"""

from __future__ import annotations

import os
from pathlib import Path

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
RUN_FILES = ("config.yaml", *OUTPUTS)
LOCK_FILE = ".lock"


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message says how to proceed."""


class RunLock:
    """An exclusive lock on a run folder, held until `release` (or the process ends)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
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

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(run_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> RunLock:
    """Create or take over `run_dir` for this process's run; see the module docstring."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if set(existing) & set(OUTPUTS) and not (resume or overwrite):
        lock.release()
        raise RunFolderError(
            f"run folder {run_dir} already holds a run ({', '.join(existing)}); continue it with "
            f"--resume {run_dir / 'last.pth'}, replace it with --overwrite, or choose another "
            f"--name"
        )
    if overwrite and not resume:
        for name in existing:
            (run_dir / name).unlink()
    remove_stale_temp_files(run_dir)
    return lock


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
