"""Copy reports/cifar10-matrix/matrix.md into README.md between its results markers (tests/test_published.py checks it)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- results:matrix -->", "<!-- /results:matrix -->"


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} block", file=sys.stderr)
        return 2
    table = (ROOT / "reports" / "cifar10-matrix" / "matrix.md").read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    readme.write_text(f"{head}{START}\n{table}{END}{rest.split(END, 1)[1]}", encoding="utf-8")
    print("README.md: results tables replaced from reports/cifar10-matrix/matrix.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
