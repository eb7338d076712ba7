"""The case report as a reader sees it: rendered from answers in the shape Attribution.to_dict() writes, opened
in headless Chromium at desktop and phone widths, and printed."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from engine import casereport

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
HOSTILE = ["<script>alert(1)", 'it\'s "quoted"', "javascript:alert(1)", "مولد-عربي", "שם עברי"]
NAMES = HOSTILE + [f"g{i}" for i in range(17)]  # 22 sources


class Images:
    """Stands in for the store's catalog: every image id is the same small picture."""

    def __init__(self, picture: Path):
        self.picture = picture

    def image_bytes(self, image_id: int) -> bytes:
        return self.picture.read_bytes()


def answer(verdict: str, names: list[str] = NAMES, query: str = "q.png") -> dict:
    """An answer as Attribution.to_dict() writes it: scores best first, probabilities falling, 3 closest each."""
    weights = [0.5 ** i for i in range(len(names))]
    total = sum(weights)
    scores = [{"source": n, "score": 0.99 - i / 1000, "resyntheses": 1 + i % 12, "probability": w / total}
              for i, (n, w) in enumerate(zip(names, weights))]
    return {"query": query, "description": "a portrait", "description_from": "prompt", "predicted": names[0],
            "margin": 0.001, "scores": scores, "missing": [], "calibrated": verdict != "uncalibrated",
            "cached": 3, "generated": 0, "failed": {}, "verdict": verdict,
            "evidence": {"score": 0.99, "threshold": 0.995, "references": 3},
            "closest": {n: [{"image_id": 10 * i + k, "similarity": 0.99 - k / 100} for k in range(3)]
                        for i, n in enumerate(names)}}


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pic") / "p.png"
    Image.new("RGB", (160, 160), (90, 140, 200)).save(path)
    return path


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        found = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
        try:
            yield found
        finally:
            found.close()


def report(tmp_path: Path, picture: Path, answers: list[dict]) -> Path:
    head = {"store": "s", "embedder": "e", "sources": [{"name": n, "kind": "diffusers"} for n in NAMES]}
    entries = [{"label": a["query"], "thumb": casereport.thumbnail(picture), "result": a} for a in answers]
    path = tmp_path / "report.html"
    path.write_text(casereport.to_string(head, entries, Images(picture), index=casereport.index_of(
        {"results": answers})), encoding="utf-8")
    return path


def test_only_a_known_verdict_colours_its_best_source_as_the_answer(tmp_path, picture):
    """The best bar of an unknown verdict was green, the attributed source's colour, beside "unknown source"."""
    text = report(tmp_path, picture, [answer("unknown")]).read_text(encoding="utf-8")
    assert "class='fill top'" not in text and "12b76a'" not in text
    text = report(tmp_path, picture, [answer("known")]).read_text(encoding="utf-8")
    assert text.count("class='fill top'") == 1


def test_several_queries_open_with_an_index_of_their_verdicts(tmp_path, picture, browser):
    """A triage of hundreds of images was one case after another: now a table first, one row per query, each a
    link to its case; an unknown verdict's best source reads as the closest, not as the answer."""
    answers = [answer("unknown", query="<img src=x onerror=alert(1)>.png"), answer("known", query="b.png"),
               answer("uncalibrated", query="c.png")]
    path = report(tmp_path, picture, answers)
    text = path.read_text(encoding="utf-8")
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;.png" in text
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(path.as_uri())
        rows = page.eval_on_selector_all("table.index tr", "rs => rs.slice(1).map(r => r.innerText.split('\\t'))")
        assert [r[0] for r in rows] == ["1", "2", "3"]
        assert rows[0][1] == "<img src=x onerror=alert(1)>.png"  # shown as text, run as nothing
        assert rows[0][3] == "none of the enrolled sources (closest: <script>alert(1))"
        assert rows[1][3] == "<script>alert(1)" and rows[2][3] == "<script>alert(1) (uncalibrated)"
        assert page.text_content("body").count("3 queries: 1 unknown, 1 known, 1 uncalibrated") == 1
        page.click("table.index a[href='#q3']")
        assert page.evaluate("location.hash") == "#q3"
    finally:
        page.close()
    # each case pictures its 6 best sources' evidence, the other 16 as numbers (500 queries over 22 sources
    # embedded 33,000 thumbnails: about 260 MB of HTML for photographs)
    assert text.count("resynthesis'>") == 3 * casereport.EVIDENCE_SOURCES * 3  # queries x sources x closest
    assert text.count("closest resynthesis of the other 16 sources") == 3 and "g16 0.9900" in text
    one = report(tmp_path, picture, answers[:1]).read_text(encoding="utf-8")
    assert "table class='meta index'" not in one  # one query: its case is the index
    assert one.count("resynthesis'>") == 3 * len(NAMES) and "of the other" not in one  # every source pictured


def test_bars_share_one_scale_on_a_phone_and_evidence_tiles_on_a_desktop(tmp_path, picture, browser):
    """At 390 px each bar's track was as wide as its own number left it ('1 ref' against '12 refs'), so equal
    probabilities drew unequal bars; 22 sources' evidence took 22 rows of three thumbnails each."""
    path = report(tmp_path, picture, [answer("known")])
    page = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        page.goto(path.as_uri())
        tracks = page.eval_on_selector_all(".bar .track", "els => els.map(e => [e.getBoundingClientRect().left,"
                                           " e.getBoundingClientRect().width])")
        assert len(tracks) == len(NAMES) and len(set(map(tuple, tracks))) == 1, tracks
        assert tracks[0][1] >= 40
        assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 1
        page.set_viewport_size({"width": 1280, "height": 900})
        tops = page.eval_on_selector_all(".sources .source", "els => els.map(e => e.getBoundingClientRect().top)")
        assert len(tops) == len(NAMES) and len(set(tops)) <= len(NAMES) // 2, tops  # 160 px thumbnails: two a row
    finally:
        page.close()


def test_the_bars_and_verdicts_print(tmp_path, picture, browser):
    """Browsers print no backgrounds by default: the bars (background colours) printed as nothing at all."""
    page = browser.new_page()
    try:
        page.goto(report(tmp_path, picture, [answer("unknown")]).as_uri())
        page.emulate_media(media="print")
        adjust = page.eval_on_selector_all(".fill, .track, .badge", "els => els.map(e => getComputedStyle(e)"
                                           ".printColorAdjust)")
        assert adjust and set(adjust) == {"exact"}
    finally:
        page.close()
