"""`python scripts/layout_check.py REPORT.html [--width 1400]`: does the page fit without horizontal scrolling?

Opens a copy of the page in headless Chromium at the given window width, lets the page
report document.scrollWidth against the viewport's clientWidth, and saves a screenshot
beside the copy. Exit 0 when it fits, 1 when it scrolls, 2 when Chromium is missing
(Debian: apt-get install chromium).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = ("<script>document.title = 'layout scroll=' + document.documentElement.scrollWidth + "
         "' client=' + document.documentElement.clientWidth;</script></body>")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", type=Path)
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args()
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        print("error: no Chromium found; install it (apt-get install chromium)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-layout-"))
    probe = tmp / "page.html"
    probe.write_text(args.page.read_text(encoding="utf-8").replace("</body>", PROBE), encoding="utf-8")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={args.width},900"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    subprocess.run([*flags, f"--screenshot={tmp / 'page.png'}", probe.as_uri()], capture_output=True, timeout=120)
    found = re.search(r"layout scroll=(\d+) client=(\d+)", dom)
    if not found:
        print("error: the page did not report its width (did Chromium run?)", file=sys.stderr)
        return 2
    scroll, client = map(int, found.groups())
    fits = scroll <= client
    print(f"{args.page}: scrollWidth {scroll} px, clientWidth {client} px at a {args.width} px window: "
          f"{'fits, no horizontal scrolling' if fits else 'SCROLLS horizontally'}; screenshot {tmp / 'page.png'}")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
