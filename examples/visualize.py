"""Visualise what a trained CIN / PCA-Net looks at, as PNG figures (needs matplotlib).

    python examples/visualize.py runs/<run>/best.pth --out vis/ --num-pairs 4

The same as the ``fgattn-visualize`` command; see `fgattn.cli.visualize` for what each figure
shows and ``--help`` for the options.
"""

import sys

from fgattn.cli.visualize import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    sys.exit(main())
