"""A screenshot of a page for the docs (the Dagster UI's Runs page, an evaluation report), in Debian's
chromium-headless-shell driven by playwright, as the chat page's screenshot and browser test are taken.

    .venv/bin/finpipe ui &
    .venv/bin/python scripts/docs_screenshot.py http://127.0.0.1:3000/runs docs/images/runs-page.png \
        --wait-for train_evaluate_promote --dismiss Skip
    .venv/bin/python scripts/docs_screenshot.py data_lake/models/adapters/RUN/evaluation/report.html \
        docs/images/report-verdict.png --height 700
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from page_screenshot import browser_page, save


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="a URL, or a local HTML file")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--wait-for", help="text the page must show before the screenshot")
    parser.add_argument("--dismiss", help="a button to click first when it shows (the Dagster UI's first-visit dialog: "
                        "Skip)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=800, help="the window's height: the part of the page captured")
    parser.add_argument("--timeout-s", type=float, default=120)
    args = parser.parse_args(argv)
    url = args.url if "://" in args.url else Path(args.url).resolve().as_uri()
    with browser_page(args.width, args.height) as page:
        from playwright.sync_api import expect

        page.goto(url, timeout=args.timeout_s * 1000)
        if args.dismiss:
            button = page.get_by_role("button", name=args.dismiss)
            try:
                button.click(timeout=15_000)
            except Exception:  # noqa: BLE001 - no such dialog this time
                pass
        if args.wait_for:
            expect(page.get_by_text(args.wait_for).first).to_be_visible(timeout=args.timeout_s * 1000)
        page.wait_for_timeout(1500)  # the UI's late layout (fonts, tables)
        save(page, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
