"""Hostile files, not hostile requests: text a file's author controls reaching the analyst's HTML, absurd
recipes reaching a redraw, and downloaded datasets reaching outside their folder. Each case was a defect."""
from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image, PngImagePlugin

from engine import casereport
from engine.errors import UserError
from engine.labelled import LISTED_TWICE, from_rows
from engine.manifest import read_manifest
from engine.provenance import read_provenance
from engine.provenance.generators import from_texts
from engine.provenance.reproduce import MAX_STEPS, recipe_of
from engine.published import BROKEN_LINK, NOT_UTF8, UNPRINTABLE_NAME, import_published
from index.errors import StoreInputError
from index.keys import check_text

XSS = "<script>alert(1)</script>\"'><img src=x onerror=alert(2)>&amp;"
RLO = "\u202e"  # right-to-left override: "\u202egnp.exe" displays as "exe.png"
CHROMIUM = Path("/usr/bin/chromium")


def _png(texts: dict[str, str] | None = None, size: int = 32, colour: str = "red") -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (texts or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: Counter = Counter()
        self.attributes: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        self.attributes.update(name for name, _ in attrs)


def _hostile_report() -> str:
    """A case report whose every file-controlled field is hostile: a 1 MB prompt, names, notes, C2PA text."""
    prompt = (XSS + RLO + " ") * 16_000  # about 1 MB
    params = (f"{prompt}\nNegative prompt: {XSS}\nSteps: 1000000000000, Sampler: {XSS}, CFG scale: NaN, Seed: -1, "
              f"Size: 99999999x9, Model: {XSS}{'M' * 900}")
    data = _png({"parameters": params, "Comment": XSS * 100})
    found = read_provenance(data, c2pa=False, watermark=False)
    meta = found.metadata
    assert meta is not None and meta.prompt is not None and len(meta.prompt) == 64 << 10  # cut on reading
    provenance = found.to_dict()
    provenance["c2pa"] = {"state": "untrusted", "claim_generator": XSS + RLO, "title": XSS}
    name = f"{RLO}{XSS}"[:200]  # a source name may be 200 characters of anything but slashes
    result = {"query": f"{RLO}gnp.exe{XSS}", "description": meta.prompt, "description_from": "metadata",
              "predicted": name, "margin": float("nan"), "verdict": "uncalibrated",
              "scores": [{"source": name, "score": 0.9, "probability": float("nan")},
                         {"source": "W" * 200, "score": 0.8, "probability": "x"}],
              "missing": [XSS], "evidence": {"why": "no acceptance threshold", "provenance": {
                  "claims": meta.model_name, "enrolled": None, "conclusion": f"the file names {meta.model_name}"}},
              "closest": {name: [{"image_id": XSS, "similarity": XSS}]}, "cached": 0, "generated": 0,
              "provenance": provenance}
    head = {"store": "store", "embedder": "clip", "created": "now", "command": "resynth attribute x.png",
            "sources": [{"name": name, "kind": "replay", "fingerprint": "ab" * 32, "recipe": "replay"}]}
    entries = [{"label": result["query"], "thumb": casereport.thumbnail(data), "sha256": "0" * 64,
                "result": result}, {"label": f"{XSS}{RLO}\udcff.png", "error": XSS}]  # a name that is not UTF-8
    return casereport.to_string(head, entries)


def test_case_report_holds_hostile_text_as_bounded_inert_text(tmp_path):
    """Escaped, bounded, and in Debian's chromium (when installed) nothing runs or overflows, on the report and
    on the web page showing the same kind of answer."""
    page = _hostile_report()
    assert len(page) < 60_000  # from a 1 MB prompt: 465 KB before, 19 KB now (every value cut to 2000 characters)
    parsed = _Tags()
    parsed.feed(page)
    assert parsed.tags["script"] == 0 and parsed.tags["img"] == 1  # the query's own thumbnail only
    assert not [a for a in parsed.attributes if a.startswith("on")]
    assert RLO not in page and "\\u202e" in page  # shown as an escape, never reversing what follows
    assert page.count("more characters)") >= 2  # the description line and the prompt in the provenance block
    page.encode("utf-8")  # a file name that is not UTF-8 failed the report's write
    if not CHROMIUM.exists():
        return
    (tmp_path / "report.html").write_text(page, encoding="utf-8")
    static = Path(__file__).resolve().parents[1] / "engine" / "service" / "static" / "index.html"
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox",
                                                                                    "--disable-gpu"])
        dialogs: list[str] = []  # an alert() that ran
        try:
            for url, answer in ((f"file://{tmp_path / 'report.html'}", None), (static.as_uri(), _answer())):
                tab = browser.new_page(viewport={"width": 1024, "height": 768})
                tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
                tab.goto(url)
                if answer is not None:  # the web page's own rendering of an answer (no server: thumbnails fail)
                    tab.evaluate("(r) => { answers = [{r, file: null, index: 0}, {r, file: null, index: 1}];"
                                 " renderTable(); show(0); }", answer)
                    assert RLO not in tab.inner_text("#result") and "\\u202e" in tab.inner_text("#verdict")
                width, window = tab.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
                assert width <= window and not dialogs, (url, width)  # was 70,000 px wide, 43,000 on the page
                assert tab.evaluate("() => document.querySelectorAll('script').length") <= 1
        finally:
            browser.close()


def test_a_small_file_of_compressed_quotes_makes_a_small_case():
    """Quotes escape 7-fold in the report's provenance (\\&quot;) and zTXt compresses them 600-fold: a 3.5 KB
    file made a 2.2 MB case (measured); every value is now cut to 2000 characters, the block to 20,000."""
    info = PngImagePlugin.PngInfo()
    settings = ", ".join(f"K{i}: " + "&" * 400 for i in range(70))
    info.add_text("parameters", '"' * 1_900_000 + f"\nSteps: 20, Sampler: a, CFG scale: 7, {settings}", zip=True)
    info.add_text("invokeai_metadata", json.dumps({**{f"k{i}": '"' * 3000 for i in range(70)},
                                                   "positive_prompt": '"' * 70_000}), zip=True)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG", pnginfo=info)
    found = read_provenance(buffer.getvalue(), c2pa=False, watermark=False)
    assert found.metadata is not None and len(buffer.getvalue()) < 5000
    result = {"query": "q.png", "description": found.metadata.prompt, "description_from": "metadata",
              "verdict": "uncalibrated", "predicted": "s", "scores": [], "provenance": found.to_dict()}
    page = casereport.to_string({"sources": []}, [{"label": "q.png", "result": result}])
    assert len(page) < 150_000 and "more characters in the JSON answer" in page
    whole, shown = map(int, re.search(r"provenance \((\d+) characters, cut to (\d+)\)", page).groups())
    assert whole > 300_000 and shown < casereport.MAX_PROVENANCE + 100  # the summary counted the cut text
    small = casereport.to_string({"sources": []}, [{"label": "q.png", "result": {**result, "provenance": {
        "metadata": {"prompt": "a cat"}}}}])
    assert re.search(r"provenance \(\d+ characters\)", small)


def _answer() -> dict:
    name = f"{RLO}{XSS}"
    answer = {"query": f"{RLO}gnp.exe{XSS}{'W' * 120}", "description": "P" * 70_000, "description_from": "metadata",
              "predicted": name, "margin": 0.1, "verdict": "uncalibrated", "calibrated": False,
              "scores": [{"source": name, "score": 0.9, "probability": 0.6},
                         {"source": "W" * 200, "score": 0.8, "probability": 0.4}],
              "missing": [XSS], "cached": 0, "generated": 0, "closest": {"W" * 200: [{"image_id": 1, "similarity": 1}]},
              "evidence": {"why": "no acceptance threshold", "provenance": {"claims": "M" * 1000, "enrolled": None,
                                                                           "conclusion": f"names {'M' * 1000}"}},
              "provenance": {"metadata": {"prompt": XSS + RLO}}}
    return answer


A1111 = "a portrait\nSteps: {steps}, Sampler: DDIM, CFG scale: {cfg}, Seed: {seed}, Size: {size}, Model: sd"


@pytest.mark.parametrize("steps, cfg, seed, size, why", [
    (10 ** 12, 7, 1, "64x64", "steps out of range"),
    (20, 7, 1, "99999999x9", "size out of range"),
    (20, "NaN", 1, "64x64", "cfg_scale out of range"),
    (20, 7, 2 ** 64, "64x64", "seed out of range"),
    (20, 7, -5, "64x64", "seed -5 is not one a generator draws with"),
    (MAX_STEPS + 1, 7, 1, "64x64", f"a redraw takes at most {MAX_STEPS}"),
    (20, 99999, 1, "64x64", "guidance 99999 is outside"),
    (MAX_STEPS, 7, 1, "4096x4096", "more than a redraw may cost"),
])
def test_an_absurd_recipe_is_refused_in_one_line_not_filled_from_the_source(steps, cfg, seed, size, why):
    notes: list[str] = []
    meta = from_texts({"parameters": A1111.format(steps=steps, cfg=cfg, seed=seed, size=size)}, "png", notes)
    assert meta is not None
    source = SimpleNamespace(params_json=json.dumps({"steps": 2, "guidance": 7}), path=None)  # a stored row's fields
    refused = recipe_of(meta, source, (64, 64))
    assert isinstance(refused, str) and why in refused and "\n" not in refused, refused
    good = from_texts({"parameters": A1111.format(steps=20, cfg=7, seed=2 ** 64 - 1, size="64x64")}, "png", notes)
    assert good is not None and not isinstance(recipe_of(good, source, (64, 64)), str)  # ComfyUI's largest seed


def test_comfy_graphs_that_are_not_graphs_stay_notes():
    huge = json.dumps({str(i): {"inputs": {}} for i in range(6_000)})  # over the node cap
    cases = {"huge": huge, "list": "[1, 2]", "nested": "[" * 100_000, "null node": '{"1": null}',
             "absurd": json.dumps({"1": {"class_type": "KSampler", "inputs": {
                 "positive": ["2", 0], "steps": 10 ** 12, "seed": ["1", 0], "cfg": 1e308,
                 "latent_image": ["3", 0]}}, "2": {"inputs": {"text": "x"}},
                 "3": {"inputs": {"width": 10 ** 9, "height": -8}}})}
    for name, text in cases.items():
        found = read_provenance(_png({"prompt": text}), c2pa=False, watermark=False)
        assert not [n for n in found.notes if "internal error" in n], (name, found.notes)
    meta = read_provenance(_png({"prompt": cases["absurd"]}), c2pa=False, watermark=False).metadata
    assert meta is not None and set(meta.invalid) == {"steps", "cfg_scale", "width", "height"}
    assert (meta.steps, meta.width) == (None, None) and meta.to_dict()["invalid"] == list(meta.invalid)


def test_a_computed_size_is_absent_not_invalid_and_invokeai_recipes_redraw():
    """A ComfyUI size computed by a node (an expression string) or behind an unresolved link is absent, filled
    from the image (e6635b3 refused it as 'out of range'); InvokeAI's sampler, which it writes as `scheduler`,
    is redrawable (it was read as both sampler and schedule type: 'unknown schedule type'); a guidance per step
    is refused as such."""
    source = SimpleNamespace(params_json=json.dumps({"steps": 2, "guidance": 7}), path=None)
    graph = {"3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20, "cfg": 7, "sampler_name": "euler",
                                                        "positive": ["6", 0], "latent_image": ["5", 0]}},
             "5": {"class_type": "EmptyLatentImage", "inputs": {"width": ["11", 0], "height": ["99", 0]}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat"}},
             "11": {"class_type": "SimpleMath+", "inputs": {"value": "a*8", "a": ["12", 0]}},
             "12": {"class_type": "PrimitiveInt", "inputs": {"value": 8}}}
    meta = from_texts({"prompt": json.dumps(graph)}, "png", [])
    assert meta is not None and meta.invalid == () and (meta.width, meta.height) == (None, None)
    recipe = recipe_of(meta, source, (64, 64))
    assert not isinstance(recipe, str) and recipe.filled == ("size (the image's)",), recipe
    invoke = {"positive_prompt": "a cat", "width": 64, "height": 64, "seed": 3, "steps": 20, "cfg_scale": 7}
    for name, cls in (("euler", "EulerDiscrete"), ("euler_a", "EulerAncestralDiscrete"), ("ddim", "DDIM"),
                      ("dpmpp_2m", "DPMSolverMultistep"), ("dpmpp_2m_k", "DPMSolverMultistep")):
        meta = from_texts({"invokeai_metadata": json.dumps({**invoke, "scheduler": name})}, "png", [])
        assert meta is not None
        recipe = recipe_of(meta, source, (64, 64))
        assert not isinstance(recipe, str) and recipe.scheduler == f"{cls}Scheduler" and not recipe.filled, recipe
        assert dict(recipe.scheduler_config).get("use_karras_sigmas", False) == name.endswith("_k")
    meta = from_texts({"invokeai_metadata": json.dumps({**invoke, "scheduler": "euler", "cfg_scale": [7, 6.5]})},
                      "png", [])
    assert meta is not None and meta.invalid == () and meta.to_dict()["per_step"] == ["cfg_scale"]
    assert recipe_of(meta, source, (64, 64)) == "guidance per step (a list) cannot be redrawn"


def _tree(root: Path) -> Path:
    """A published-dataset tree with the strays a download can hold: links leading out (as a Hugging Face cache
    snapshot's do, into its blobs), broken links, names that are not UTF-8, empty and non-image files named like
    images, a second file of one id."""
    images = root / "images"
    for rel, colour in (("a/00001.png", "red"), ("b/00001.png", "blue"), ("a/images/b/00001.png", "navy"),
                        ("b/images/a/00001-0.png", "pink")):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(_png(colour=colour))
    outside = root.parent / "blobs"
    outside.mkdir()
    (outside / "00002.png").write_bytes(_png())
    os.symlink("../../../blobs/00002.png", images / "a" / "00002.png")  # a file link leading out (relative)
    (root.parent / "disk").mkdir()
    (root.parent / "disk" / "00002.png").write_bytes(_png(colour="teal"))
    os.symlink(root.parent / "disk", images / "c")  # a generator folder on another disk
    os.symlink("/etc/passwd", images / "b" / "00003.png")  # followed: a regular file, but no image
    os.symlink(outside / "gone.png", images / "b" / "00007.png")  # dangling
    os.symlink("00008.png", images / "b" / "00008.png")  # a loop
    os.symlink("/dev/null", images / "b" / "00009.png")  # a device
    (images / "a" / "00004.png").write_bytes(b"")
    (images / "a" / "00005.png").write_text("not an image")
    (images / "a" / "00001-again.png").write_bytes(_png(colour="green"))
    with open(os.fsencode(images / "a") + b"/00006-\xff.png", "wb") as handle:
        handle.write(_png())
    (images / "d\x1b[2J").mkdir()  # a generator folder whose name clears the terminal it is printed on
    (images / "d\x1b[2J" / "00001.png").write_bytes(_png())
    return root


def test_import_published_follows_links_and_counts_broken_links_and_odd_names(tmp_path):
    """The user named the dataset: its links are followed (4eb2e3d skipped every file of a Hugging Face cache
    snapshot, whose images are links into ../../blobs); links to nothing or to a device are counted."""
    root = _tree(tmp_path / "dataset")
    out = root / "manifest.csv"
    report = import_published(root, out)
    assert (report.originals, report.resyntheses, report.generators) == (4, 2, ["a", "b", "c"])
    assert report.skipped == {BROKEN_LINK: 3, NOT_UTF8: 1, UNPRINTABLE_NAME: 1, "unreadable images": 3,
                              "duplicate ids (first file kept)": 1}
    rows = read_manifest(out, allow_outside=True)  # as `--ingest` reads it: the links' targets
    assert len(rows) == 6 and not list(root.glob(".*.tmp"))
    assert {r.image for r in rows if not r.image.is_relative_to(root)} == {
        tmp_path / "blobs" / "00002.png", tmp_path / "disk" / "00002.png"}
    empty = tmp_path / "empty" / "images" / "g"  # a folder of zero-byte and non-image files: counted, one line
    empty.mkdir(parents=True)
    for name in ("00001.png", "00002.jpg", "notes.txt"):
        (empty / name).write_bytes(b"")
    with pytest.raises(UserError, match="skipped 1 not dataset images, 2 unreadable images$"):
        import_published(tmp_path / "empty", tmp_path / "empty.csv")


@pytest.mark.parametrize("name, text, why", [
    ("up.csv", "image,source,description,role\n../../../../etc/passwd,s,d,original\n", "outside the manifest's"),
    ("abs.csv", "image,source,description,role\n/etc/passwd,s,d,original\n", "outside the manifest's"),
    ("link.csv", "image,source,description,role\nlink.png,s,d,original\n", "outside the manifest's"),
    ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", "not valid JSON"),
    ("bytes.csv", b"image,source,description,role\na.png,s\xff,d,original\n", "not a readable CSV"),
    ("many.csv", "image,source,description,role\n" + "a.png,s,d,original\n" * 4, "more than 3 rows"),
    ("many.jsonl", '{"image": "a.png", "source": "s", "description": "d", "role": "original"}\n' * 4, "more than 3"),
    ("lone.jsonl", '{"image": "a.png", "source": "s", "description": "\\ud800", "role": "original"}\n', "surrogate"),
    ("ansi.jsonl", '{"image": "a.png", "source": "\\u001b]0;x\\u0007", "description": "d", "role": "original"}\n',
     "control, bidi or invisible"),
    ("inf.jsonl", '{"image": "a.png", "source": "s", "description": "d", "role": "original", "seed": Infinity}\n',
     "seed must be an integer"),
])
def test_a_hostile_manifest_is_one_line(tmp_path, monkeypatch, name, text, why):
    monkeypatch.setattr("engine.manifest.MAX_ROWS", 3)  # stands for 1,000,000 (10^7 rows: minutes, gigabytes)
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path.parent / f"{tmp_path.name}-secret.png").write_bytes(_png())
    os.symlink(tmp_path.parent / f"{tmp_path.name}-secret.png", tmp_path / "link.png")
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError) as error:
        read_manifest(path, allow_outside=False)
    assert why in str(error.value) and "\n" not in str(error.value)


def test_source_names_follow_one_rule_in_the_store_and_in_manifests_and_the_report_shows_them(tmp_path):
    """The store took 'sdxl\u202etxt' (it refused only control characters) which its own manifests refuse;
    the case report showed a carriage return in a prompt as \\u000d."""
    (tmp_path / "a.png").write_bytes(_png())
    for name, refused in (("sdxl\u202etxt", True), ("a\u200bb", True), ("a\x1bb", True), ("x\u2066y", True),
                          ("a\ufeffb", True), ("\u0645\u200c\u0627", False), ("\U0001f468\u200d\U0001f467", False)):
        path = tmp_path / "m.jsonl"
        path.write_text(json.dumps({"image": "a.png", "source": name, "description": "d", "role": "original"}))
        if refused:
            with pytest.raises(StoreInputError, match=r"character U\+[0-9A-F]{4}: remove it$"):
                check_text(name, "source name", controls=True)
            with pytest.raises(UserError, match="control, bidi or invisible"):
                read_manifest(path)
        else:
            check_text(name, "source name", controls=True)
            assert read_manifest(path)[0].source == name
    assert casereport.e("a\rb\tc\nd\u202ee\u200bf\x1b") == "a\rb\tc\nd\\u202ee\\u200bf\\u001b"


def test_calibration_sets_use_a_repeated_row_once_and_refuse_contradictions(tmp_path):
    for name, colour in (("o.png", "red"), ("r.png", "blue")):
        (tmp_path / name).write_bytes(_png(colour=colour))
    head = "image,source,description,role\n"
    rows = "o.png,a,d,original\no.png,a,d,original\nr.png,a,d,resynthesis\nr.png,a,d,resynthesis\n"
    (tmp_path / "m.csv").write_text(head + rows)
    evalset = from_rows(read_manifest(tmp_path / "m.csv"), str(tmp_path / "m.csv"))
    assert evalset.n_originals == 1 and len(evalset.res_hash) == 1 and evalset.skipped == {LISTED_TWICE: ["o.png"]}
    (tmp_path / "c.csv").write_text(head + "o.png,a,d,original\no.png,b,d,original\nr.png,a,d,resynthesis\n")
    with pytest.raises(UserError, match="listed as 'b' here and as 'a' on line 2"):
        from_rows(read_manifest(tmp_path / "c.csv"), str(tmp_path / "c.csv"))
    with open(tmp_path / "r.png", "r+b") as handle:  # sparse: 65 MB on paper, nothing on disk
        handle.truncate(65 << 20)
    with pytest.raises(UserError, match="bytes, the limit is"):  # refused by its size, not hashed whole first
        from_rows(read_manifest(tmp_path / "m.csv"), str(tmp_path / "m.csv"))


def test_a_seed_beyond_the_store_column_is_redrawn_once_then_cached(models, originals, tmp_path):
    """ComfyUI draws seeds up to 2^64-1; the store's seed column holds less. The redraw failed after drawing
    (and drew again at every request, leaving a file behind each time); now it is stored and reused."""
    import engine
    from engine import Options
    from tests.helpers import run_cli

    query = next(o for o in originals if o["source"] == "tiny-sd-ddim")
    store = tmp_path / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], "--quiet") == 0
    assert run_cli("source", "add", "tiny-sd-ddim", models["pipelines"]["tiny-sd-ddim"], "--store", store,
                   "--steps", 2, "--quiet") == 0
    claim = tmp_path / "comfy-seed.png"
    pixels = Image.open(query["image"]).convert("RGB")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"{query['prompt']}\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: {2 ** 63 + 5}, "
                                f"Size: {pixels.width}x{pixels.height}, Model: tiny-sd-ddim")
    pixels.save(claim, "PNG", pnginfo=info)
    one = Options(mode="resynthesis", per_source=1)
    with engine.open(store) as ws:
        first = ws.attribute(claim, options=one).results[0].evidence["provenance"]["reproduction"]
        assert first["state"] in ("reproduced", "not reproduced") and first["cached"] is False, first
        calls = sum(ws.generator_calls.values())
        again = ws.attribute(claim, options=one).results[0].evidence["provenance"]["reproduction"]
        assert again["cached"] is True and sum(ws.generator_calls.values()) == calls
