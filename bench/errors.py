"""One-line errors for bad input: the message names the problem and the fix; exit status 2."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence

USAGE_EXIT = 2


class UsageError(Exception):
    """Bad input from the user; printed as one line, exit status 2, nothing stored is touched."""


_URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^:/@\s]*):\S*@")  # greedy: up to the token's last '@'
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pwd|pass)=)[^&\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """Hide passwords inside `text`: `scheme://user:password@host` (any character in the password,
    '@' included) and `?password=...` query parameters."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", text))


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    try:
        return main(argv)
    except UsageError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return USAGE_EXIT
