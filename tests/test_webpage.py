"""The web page in headless Chromium (Debian's, driven by Playwright; no browser download):
upload a Kather tile, see its neighbours with labels and scores and the classification,
and keep a screenshot (copied to $MEDRAY_SAVE_SCREENSHOT when set)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import skip_or_fail

from medray.serving import local
from medray.serving.config import ServeConfig

pytestmark = pytest.mark.integration
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def page_url(request, tmp_path_factory):
    if not CHROMIUM.exists():
        skip_or_fail(f"{CHROMIUM} not found: `make browser` installs Debian's chromium")
    pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    pytest.importorskip("medray.registry", reason="needs the registry (bundle) module")
    request.getfixturevalue("ray_local")
    from serving_helpers import tiny_demo

    cfg, _ = tiny_demo(str(tmp_path_factory.getbasetemp()))
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDRAY_API_KEYS", "k1")
    scfg = ServeConfig(workdir=cfg.workdir, model_name=cfg.model_name, ray=cfg.ray, port=0)
    served = local.start(scfg)
    yield served.url
    local.stop()
    mp.undo()


def test_upload_shows_neighbours_and_classes(page_url, kather_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    tile = sorted((kather_dir / "01_TUMOR").iterdir())[0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.goto(page_url + "/")
            page.fill("#apikey", "k1")
            page.dispatch_event("#apikey", "change")
            page.set_input_files("#file", str(tile))
            # a locator, not wait_for_function: the page's CSP (script-src 'self') forbids
            # the eval a string predicate needs
            page.locator('.neighbor img[src^="blob:"]').nth(9).wait_for(timeout=60_000)
            cards = page.locator(".neighbor")
            assert cards.count() == 10
            first = cards.nth(0).inner_text()
            assert "#1" in first and "score" in first and page.locator(".neighbor .label").count()
            assert page.locator("#classes tr.decided").count() >= 1
            assert page.eval_on_selector("#query-img", "img => img.naturalWidth") > 0
            assert "neighbours from" in page.inner_text("#status")
            assert page.evaluate("localStorage.getItem('medray.apiKey')") == "k1"
            shot = tmp_path / "serve-page.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("MEDRAY_SAVE_SCREENSHOT"):  # tests write nothing into the repo unless asked
        shutil.copy(shot, os.environ["MEDRAY_SAVE_SCREENSHOT"])


def test_page_without_key_says_so(page_url, kather_dir):
    from playwright.sync_api import sync_playwright

    tile = sorted((kather_dir / "02_STROMA").iterdir())[0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(page_url + "/")
            page.evaluate("localStorage.clear()")
            page.fill("#apikey", "wrong")
            page.dispatch_event("#apikey", "change")
            page.set_input_files("#file", str(tile))
            page.wait_for_selector("#status.error", timeout=30_000)
            assert "401" in page.inner_text("#status")
        finally:
            browser.close()
