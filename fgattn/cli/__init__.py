"""Command-line entry points (console scripts of the wheel): ``fgattn-train`` (`train`),
``fgattn-eval`` (`evaluate`), ``fgattn-visualize`` (`visualize`); ``python -m fgattn.train`` is
``fgattn-train``. The scripts in ``examples/`` call the same functions.

A mistake in the command (config, data, checkpoint, run folder, device, the ``$FGATTN_BACKEND``
variable once fgattn has imported) is one line on stderr, ``<prog>: error: <message>``, and exit
status 2, as argparse does for a bad flag; ``--debug`` shows the traceback instead. Errors after
training has started are not the user's: they propagate with their traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType

import yaml

from .. import backends
from ..train.rundir import RunFolderError

__all__ = ["USER_ERRORS", "UserErrors"]

# What a wrong command raises before a run starts: bad option values and model arguments
# (ValueError, TypeError), missing files and folders (OSError), an extra not installed
# (ImportError, e.g. scipy for Stanford Cars), a malformed YAML, a run folder in use.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, yaml.YAMLError, RunFolderError)


class UserErrors:
    """Context manager: a `USER_ERRORS` exception leaving the block before `started` is called
    becomes ``<prog>: error: <message>`` on stderr and ``SystemExit(2)``; with ``--debug`` in
    ``argv`` it propagates unchanged."""

    def __init__(self, argv: list[str], prog: str | None = None) -> None:
        self.prog = prog or Path(sys.argv[0]).name
        self.debug = "--debug" in argv
        self.has_started = False

    def started(self, *_: object) -> None:
        """From here on, errors are not the user's (training has started)."""
        self.has_started = True

    def __enter__(self) -> UserErrors:
        try:
            check_environment()
        except USER_ERRORS as error:
            self.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def __exit__(
        self, kind: type | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if error is None or self.debug or self.has_started or not isinstance(error, USER_ERRORS):
            return
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{self.prog}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2)


def check_environment() -> None:
    """The environment variables fgattn reads: ``$FGATTN_BACKEND`` must name a backend and
    ``$FGATTN_BENCHMARK`` be 1 or 0 (a ValueError naming it, turned into one line by
    `UserErrors`)."""
    backends.check_backend(
        os.environ.get(backends.ENV_BACKEND) or "auto", f"${backends.ENV_BACKEND}"
    )
    backends.get_benchmark()
