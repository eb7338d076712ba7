"""The web page at `/`, end to end: a real `resynth serve` process driven by headless Chromium."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run_cli

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")
from engine.service.process import ServerProcess  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """`resynth serve` over a fresh store with the tiny pipelines; the page's first query generates."""
    store = tmp_path_factory.mktemp("web") / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"]) == 0
    for name, folder in models["pipelines"].items():
        assert run_cli("source", "add", name, folder, "--store", store, "--steps", 2, "--quiet") == 0
    process = ServerProcess(store)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page()
            tab.set_default_timeout(60_000)
            tab.goto(server.url + "/")
            yield tab
        finally:
            browser.close()


def test_drop_an_image_and_see_ranked_sources(page, originals):
    original = originals[5]
    page.set_input_files("#file", str(original["image"]))
    page.fill("#prompt", original["prompt"])
    page.click("#submit")
    page.wait_for_selector("#result:not([hidden]) .bar")
    bars = page.locator("#bars .bar")
    count = len({o["source"] for o in originals})
    assert bars.count() == count
    names = [bars.nth(i).get_attribute("data-source") for i in range(count)]
    assert sorted(names) == sorted({o["source"] for o in originals})
    widths = [float(bars.nth(i).locator(".fill").evaluate("e => parseFloat(e.style.width)")) for i in range(count)]
    assert widths == sorted(widths, reverse=True) and sum(widths) == pytest.approx(100.0, abs=0.5)  # probabilities
    verdict = page.text_content("#verdict")
    assert names[0] in verdict and "uncalibrated" in verdict  # never "known source" without a calibration
    assert "known source" not in verdict
    meta = page.text_content("#meta")
    assert "margin 0." in meta and original["prompt"] in meta and "generated resyntheses" in meta
    assert page.is_hidden("#error")


def test_an_undecodable_upload_shows_the_error(page):
    page.set_input_files("#file", files=[{"name": "broken.png", "mimeType": "image/png",
                                          "buffer": b"these bytes are not a picture"}])
    page.fill("#prompt", "anything at all")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    message = page.text_content("#error")
    assert "broken.png" in message and "undecodable_image" in message
    assert page.is_hidden("#result")
