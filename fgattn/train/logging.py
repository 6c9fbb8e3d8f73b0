"""What a run writes for people to read: summary.csv, loss / accuracy plots, the test confusion of
the worst classes, one short line per epoch. The figures are drawn by `fgattn.plots`."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import torch

from .. import plots

_warned_matplotlib = False


def log_epoch(history: list[dict[str, float]], run_dir: Path, with_plots: bool) -> None:
    """After an epoch: rewrite summary.csv (and the plots) and print the epoch's row."""
    write_summary(history, run_dir)
    if with_plots:
        write_plots(history, run_dir)
    print(format_row(history[-1]), flush=True)


def _rounded(value):
    """A float to 12 significant digits, so that 0.034999999999999996 is written 0.035."""
    return float(f"{value:.12g}") if isinstance(value, float) else value


def write_summary(history: list[dict[str, float]], run_dir: Path) -> None:
    """Rewrite summary.csv from the full history, atomically.

    Rewritten rather than appended (as timm's update_summary does) so that a run resumed after a
    crash between the checkpoint and the CSV write never duplicates or loses a row.
    """
    if not history:
        return
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows({k: _rounded(v) for k, v in row.items()} for row in history)
    tmp = run_dir / ".summary.csv.tmp"
    tmp.write_text(buf.getvalue())
    os.replace(tmp, run_dir / "summary.csv")


def _matplotlib_available() -> bool:
    """Whether matplotlib imports; says once (per process) that the plots are skipped if not."""
    global _warned_matplotlib
    try:
        plots.require_matplotlib()
    except ImportError:
        if not _warned_matplotlib:
            print(f"matplotlib is not installed: skipping the run's plots ({plots.INSTALL_HINT})",
                  flush=True)  # fmt: skip
            _warned_matplotlib = True
        return False
    return True


def write_plots(history: list[dict[str, float]], run_dir: Path) -> bool:
    """loss.png (total, per-term and test panels) and accuracy.png from the history; skipped
    (with a message) without matplotlib."""
    if not _matplotlib_available():
        return False
    plots.save(plots.loss_figure(history), run_dir / "loss.png")
    plots.save(plots.accuracy_figure(history), run_dir / "accuracy.png")
    return True


def write_confusion(
    confusion: torch.Tensor,
    classes: list[str],
    run_dir: Path,
    caption: str,
    plot: bool = True,
    worst: int = 10,
) -> None:
    """confusion.csv (the full test confusion matrix, rows true class, columns predicted) and,
    with ``plot`` and matplotlib, confusion_worst.png: the ``worst`` classes of lowest test
    accuracy and the classes they are taken for (`fgattn.plots.confusion_figure`)."""
    counts = confusion.tolist()
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["true \\ predicted", *classes])
    writer.writerows([name, *row] for name, row in zip(classes, counts, strict=True))
    tmp = run_dir / ".confusion.csv.tmp"
    tmp.write_text(buf.getvalue())
    os.replace(tmp, run_dir / "confusion.csv")
    if plot and _matplotlib_available():
        fig = plots.confusion_figure(confusion.numpy(), classes, k=worst, title=caption)
        plots.save(fig, run_dir / "confusion_worst.png")


def _finite(row: dict[str, float], key: str) -> bool:
    value = row.get(key)
    return isinstance(value, (int, float)) and math.isfinite(value)


def format_row(row: dict[str, float]) -> str:
    """One epoch's row as a console line under 120 characters, test top-1 first (every loss
    term is in summary.csv), e.g.
    "epoch 3 | test_top1 91.41 (ema 90.23) | top5 100.00 | train_loss 5.419 | train_acc 84.18 |
    lr 0.035 | 49.2 s"."""
    parts = [f"epoch {int(row['epoch'])}"]
    if _finite(row, "test_top1"):
        ema = f" (ema {row['ema_test_top1']:.2f})" if _finite(row, "ema_test_top1") else ""
        parts.append(f"test_top1 {row['test_top1']:.2f}{ema}")
    if _finite(row, "test_top5"):
        parts.append(f"top5 {row['test_top5']:.2f}")
    for key, spec in (("train_loss", "{:.4g}"), ("train_acc", "{:.2f}"), ("lr", "{:.4g}")):
        if _finite(row, key):
            parts.append(f"{key} {spec.format(row[key])}")
    if _finite(row, "epoch_time_s"):
        seconds = row["epoch_time_s"]
        parts.append(f"{seconds:.1f} s" if seconds < 100 else f"{seconds:.0f} s")
    return " | ".join(parts)
