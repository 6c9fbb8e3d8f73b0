"""Evaluate a checkpoint of examples/train_*.py: top-1 / top-5 on the test split.

The same command as ``fgattn-eval`` (installed with the package; see ``--help``)::

    python examples/evaluate.py runs/<run>/best.pth
    python examples/evaluate.py runs/<run>/best.pth --flip   # + mirror image, logits averaged
    python examples/evaluate.py runs/<run>/last.pth --ema --data-root /data/cub
    torchrun --nproc_per_node 4 examples/evaluate.py runs/<run>/best.pth   # exact, sharded

In Python, `fgattn.cli.evaluate.run` returns the metrics as a dict.
"""

import sys

from fgattn.cli.evaluate import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    sys.exit(main())
