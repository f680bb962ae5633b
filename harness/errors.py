"""User-facing errors: one clear line on stderr and a non-zero exit, never a traceback wall."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from impls.base import ImplementationError

USER_ERROR_EXIT = 2


class HarnessError(Exception):
    """A problem with the user's input or environment; the message is one line that says what to do."""


USER_ERRORS = (HarnessError, ImplementationError)  # what every CLI turns into one ``error:`` line


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn user errors raised inside the block into ``error: <message>`` and exit code 2."""
    try:
        yield
    except USER_ERRORS as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
