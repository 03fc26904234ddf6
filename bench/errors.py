"""One-line errors for bad input: the message names the problem and the fix; exit status 2."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence

USAGE_EXIT = 2


class UsageError(Exception):
    """Bad input from the user; printed as one line, exit status 2, nothing stored is touched."""


def redact(text: str) -> str:
    """Hide the password in any URL-like `scheme://user:password@host` inside `text`."""
    return re.sub(r"(\w[\w+.-]*://[^:/@\s]*):[^@\s]*@", r"\1:***@", text)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    try:
        return main(argv)
    except UsageError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return USAGE_EXIT
