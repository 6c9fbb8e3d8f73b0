"""``fgattn-train``: train PCA-Net or CIN (``--arch``), by default on the built-in synthetic set.

    fgattn-train                                      # PCA-Net, synthetic set, CPU is fine
    fgattn-train --arch cin
    fgattn-train --recipe pcanet-cub --data-root data/cub
    fgattn-train --resume runs/<run>/last.pth
    fgattn-train --dataset cub --help                 # each flag with the value a CUB run uses

The loop is `fgattn.train.engine`; the options are `fgattn.train.config.TrainConfig`.
"""

from __future__ import annotations

import sys

from ..train import engine
from . import UserErrors


def main(argv: list[str] | None = None, *, arch: str | None = None, prog: str | None = None) -> int:
    """Run the training command; returns the exit status (0: finished or stopped and saved).

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        arch: fix the architecture ("pcanet" / "cin"), as the example scripts do; None: ``--arch``.
        prog: the command's name in messages (default: the script's file name).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    with UserErrors(argv, prog) as errors:
        engine.main(arch, argv, prog=prog, on_start=errors.started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
