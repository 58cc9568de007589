"""Look at a run's report as a person would: headless Chromium renders RUN/report.html, every image
must load, nothing may be cut at the window's width, and a screenshot is written.

    python benchmarks/report_check.py RUN [--width 1200] [--out report.png]

Needs a Chromium (`apt-get install chromium`); the test suite does not (it checks the HTML itself:
tests/test_loop.py). Prints one line per check and exits 1 when one fails.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const cut = document.documentElement.scrollWidth > window.innerWidth;
  document.title = `CHECK images=${images.length} broken=${broken} cut=${cut}`;
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    sys.exit("no Chromium found: apt-get install chromium")


def run(browser: str, *args: str) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    result = subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)
    return result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--out", type=Path, default=Path("report.png"))
    args = parser.parse_args()
    page = (args.run / "report.html").read_text(encoding="utf-8")
    browser = chromium()
    with tempfile.TemporaryDirectory() as tmp:  # a copy alone in a folder: as if mailed
        probe = Path(tmp) / "report.html"
        probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
        dom = run(browser, f"--window-size={args.width},900", "--virtual-time-budget=5000",
                  "--dump-dom", probe.as_uri())  # fmt: skip
        alone = Path(tmp) / "alone.html"
        alone.write_text(page, encoding="utf-8")
        run(browser, f"--window-size={args.width},6000", f"--screenshot={args.out.resolve()}",
            alone.as_uri())  # fmt: skip
    found = re.search(r"CHECK images=(\d+) broken=(\d+) cut=(\w+)", dom)
    if not found:
        print("the page did not finish loading in Chromium")
        return 1
    images, broken, cut = int(found[1]), int(found[2]), found[3] == "true"
    print(f"images: {images}, broken: {broken}")
    print(f"cut at {args.width} px: {'yes' if cut else 'no'}")
    print(f"screenshot: {args.out} ({'written' if args.out.is_file() else 'missing'})")
    return 0 if images > 0 and broken == 0 and not cut and args.out.is_file() else 1


if __name__ == "__main__":
    sys.exit(main())
