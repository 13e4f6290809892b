"""A screenshot of the chat page of a running `finpipe serve`, for the docs: one question to the champion and one in
compare mode, in Debian's chromium-headless-shell driven by playwright (the browser test's set-up).

    .venv/bin/finpipe serve &
    .venv/bin/python scripts/page_screenshot.py docs/images/chat-page.png --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
QUESTIONS = ("How volatile is AAPL right now?", "Which did better over the last 30 trading days, AAPL or MSFT?")


@contextlib.contextmanager
def browser_page(width: int, height: int):
    """A page of Debian's chromium-headless-shell (``playwright install`` cannot download a browser here)."""
    executable = shutil.which("chromium-headless-shell")
    if executable is None:
        raise SystemExit("error: chromium-headless-shell is not installed (apt-get install chromium-headless-shell)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def save(page, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1100, help="window width in pixels (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=300, help="the longest wait for an answer")
    args = parser.parse_args(argv)
    with browser_page(args.width, 900) as page:
        from playwright.sync_api import expect

        page.goto(args.url.rstrip("/") + "/")
        expect(page.locator("#model option").first).to_be_attached()
        for compare, question in zip((False, True), QUESTIONS):
            page.set_checked("#compare", compare)
            page.fill("#question", question)
            page.click("#send")
            expect(page.locator("#send")).to_have_text("Ask", timeout=args.timeout_s * 1000)
        page.fill("#question", "")
        # a window as tall as the page: a full-page capture would leave the sticky question box over the answers
        page.set_viewport_size({"width": args.width, "height": page.evaluate("document.documentElement.scrollHeight")})
        save(page, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
