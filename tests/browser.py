"""Opens a local page in Debian's headless Chromium (driven by Playwright) and reports what it saw.

Chromium comes from Debian's ``chromium`` package (``.ci/run`` installs it);
Playwright never downloads a browser. Outside CI a missing Chromium skips the
test; in CI (``CI`` set) it fails it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclasses.dataclass
class PageVisit:
    console_errors: list[str]  # console messages of type error, and uncaught page errors
    dialogs: list[str]  # alert()/confirm() a script opened (none may)
    images: list[dict]  # {src, naturalWidth, alt} of every <img>
    text: str  # the page's visible text
    scripts: int  # <script> elements in the DOM


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def visit(page_path: str, screenshot: str | None = None, width: int = 1280) -> PageVisit:
    """Loads ``page_path`` from disk (file://), waits for every image, returns what happened."""
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": 900})
        errors, dialogs = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto("file://" + os.path.abspath(page_path), wait_until="load")
        images = page.eval_on_selector_all(
            "img",
            "els => els.map(e => ({src: e.getAttribute('src'), naturalWidth: e.naturalWidth, alt: e.alt}))",
        )
        text = page.inner_text("body")
        scripts = page.eval_on_selector_all("script", "els => els.length")
        if screenshot:
            page.screenshot(path=screenshot, full_page=False)
        browser.close()
    return PageVisit(errors, dialogs, images, text, scripts)
