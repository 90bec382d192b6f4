"""The README's picture of a report: headless Chromium renders ``REPORT/index.html`` from disk, the top
of the page is kept and scaled down to a small JPEG.

    rpl-train        # its final evaluation writes work_dirs/rpl/report
    python experiments/report_screenshot.py work_dirs/rpl/report --out docs/report.jpg --gallery docs/gallery.jpg

Needs Debian's ``chromium`` (``apt-get install chromium``).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="folder with index.html")
    p.add_argument("--out", default="docs/report.jpg")
    p.add_argument("--height", type=int, default=2300, help="pixels of the page kept from the top (at 1280 wide)")
    p.add_argument("--width", type=int, default=960, help="width of the written picture")
    p.add_argument("--gallery", help="also write the report's first gallery picture here, scaled to --width x 2")
    args = p.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium is not installed (apt-get install chromium)")
    index = Path(args.report) / "index.html"
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "page.png"
        subprocess.run([browser, *FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size=1280,{args.height}",
                        f"--screenshot={png}", index.resolve().as_uri()], check=True, capture_output=True,
                       timeout=300)
        page = cv2.imread(str(png))
    scale = args.width / page.shape[1]
    small = cv2.resize(page, (args.width, round(page.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(args.out, small, [cv2.IMWRITE_JPEG_QUALITY, 80])
    print(f"wrote {args.out}")
    if args.gallery:
        strips = sorted((Path(args.report) / "img").glob("*/gallery.jpg"))
        if not strips:
            sys.exit(f"{args.report} has no gallery picture")
        strip = cv2.imread(str(strips[0]))
        width = min(strip.shape[1], 2 * args.width)
        strip = cv2.resize(strip, (width, round(strip.shape[0] * width / strip.shape[1])), interpolation=cv2.INTER_AREA)
        cv2.imwrite(args.gallery, np.ascontiguousarray(strip), [cv2.IMWRITE_JPEG_QUALITY, 82])
        print(f"wrote {args.gallery} from {strips[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
