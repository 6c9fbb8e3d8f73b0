"""``python -m fgattn.train``: the ``fgattn-train`` command (see `fgattn.cli.train`)."""

import sys

from ..cli.train import main

sys.exit(main(prog="python -m fgattn.train"))
