"""What a run writes for people to read: summary.csv, loss / accuracy plots, one line per epoch."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

_warned_matplotlib = False


def log_epoch(history: list[dict[str, float]], run_dir: Path, plots: bool) -> None:
    """After an epoch: rewrite summary.csv (and the plots) and print the epoch's row."""
    write_summary(history, run_dir)
    if plots:
        write_plots(history, run_dir)
    print(format_row(history[-1]), flush=True)


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
    writer.writerows(history)
    tmp = run_dir / ".summary.csv.tmp"
    tmp.write_text(buf.getvalue())
    os.replace(tmp, run_dir / "summary.csv")


def write_plots(history: list[dict[str, float]], run_dir: Path) -> bool:
    """loss.png and accuracy.png from the history; skipped (with a message) without matplotlib."""
    global _warned_matplotlib
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned_matplotlib:
            print("matplotlib is not installed: skipping loss/accuracy plots "
                  "(pip install matplotlib)", flush=True)  # fmt: skip
            _warned_matplotlib = True
        return False
    epochs = [row["epoch"] for row in history]
    for name, keys, ylabel in (
        ("loss", [k for k in history[-1] if "loss" in k], "loss"),
        ("accuracy", [k for k in history[-1] if k.endswith(("top1", "top5", "acc"))], "%"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            pts = [(e, row[key]) for e, row in zip(epochs, history, strict=True) if key in row]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / f"{name}.png", dpi=100)
        plt.close(fig)
    return True


def format_row(row: dict[str, float]) -> str:
    """One epoch's row as a console line: "epoch 3 | lr 0.01 | train_loss 1.234 | ..."."""
    parts = []
    for k, v in row.items():
        if k == "epoch":
            parts.append(f"epoch {int(v)}")
        elif isinstance(v, float) and not math.isnan(v):
            parts.append(f"{k} {v:.4g}")
    return " | ".join(parts)
