"""The same behaviour from the CLI, Python and HTTP: one store, one image, the three layers side by side.

Answers: `resynth attribute --json`, `Workspace.attribute(...).to_dict()` and `POST /v1/attribute` give one
JSON (the timings in `seconds` aside, and the query's label: the CLI and Python name the path they were
given, HTTP the uploaded file's name). Failures: the same mistake is the same kind and message from each
(CLI exit code, Python exception, HTTP status, all from engine.errors.kind_of). Options: one declaration,
every option reachable from each layer with one default.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

import engine
from engine.errors import kind_of, message_of
from engine.options import Options, from_args, schema
from engine.zoo import DESCRIPTIONS
from tests.helpers import dataset_subset, run_cli

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from engine.service.app import OPTION_FIELDS, create_app  # noqa: E402
from engine.service.config import Limits  # noqa: E402
from engine.service.core import Service  # noqa: E402

SOURCES = ("tiny-sd-ddim", "tiny-sd-euler")
PROMPT = DESCRIPTIONS[0]
OPTIONS = {"per_source": 2, "adaptive": False, "aggregation": "mean"}  # seeds 0 and 1: the ingested ones


@pytest.fixture(scope="module")
def store(models, zoo_dataset, tmp_path_factory) -> Path:
    """Two sources' ingested resyntheses of PROMPT (seeds 0 and 1): what the three layers are compared on.
    Nothing is generated: every layer answers from the store."""
    root = tmp_path_factory.mktemp("parity")
    manifest = dataset_subset(zoo_dataset, root / "data", descriptions=1)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows
                                if row["source"] in SOURCES and row["role"] == "resynthesis"))
    path = root / "store"
    assert run_cli("init", "--store", path, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], "--quiet") == 0
    assert run_cli("ingest", manifest, "--store", path, "--quiet") == 0  # two replay sources (no pipeline loads)
    return path


@pytest.fixture(scope="module")
def api(store):
    with TestClient(create_app(Service.open(store, Limits())), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def image(store) -> Path:
    """An original of PROMPT by the first source (not in the store)."""
    return store.parent / "data" / "originals" / SOURCES[0] / "000.png"


def _cli(capsys, *argv) -> tuple[int, dict]:
    """Exit code and the one JSON document of a `--json` command: stdout on success, stderr on failure."""
    capsys.readouterr()
    code = run_cli(*argv, "--json", "--quiet")
    out, err = capsys.readouterr()
    return code, json.loads(out if code == 0 else err)


def _flags(options: dict) -> list[str]:
    out = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        out += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return out


def _http(api, image: Path, prompt: str | None, options: dict):
    data = {name: str(value).lower() if isinstance(value, bool) else str(value) for name, value in options.items()}
    if prompt is not None:
        data["prompt"] = prompt
    return api.post("/v1/attribute", files={"image": (image.name, image.read_bytes(), "image/png")}, data=data)


def _answer(report: dict) -> dict:
    report = json.loads(json.dumps(report))
    report.pop("seconds")  # timings: each layer measures its own stages
    for result in report["results"]:
        result["query"] = Path(result["query"]).name
    return report


def test_one_answer_from_the_cli_python_and_http(store, api, image, capsys):
    with engine.open(store) as ws:
        python = ws.attribute(image, prompt=PROMPT, options=Options(**OPTIONS)).to_dict()
    code, cli = _cli(capsys, "attribute", image, "--prompt", PROMPT, "--store", store, *_flags(OPTIONS))
    assert code == 0
    response = _http(api, image, PROMPT, OPTIONS)
    assert response.status_code == 200, response.text
    http = response.json()
    assert python["cache"]["generated"] == 0 and {s["source"] for s in python["results"][0]["scores"]} == set(SOURCES)
    assert _answer(cli) == _answer(python) == _answer(http)
    assert list(cli) == list(python) == list(http)  # the same fields, in the same order
    assert cli["results"][0]["query"] == str(image) and http["results"][0]["query"] == image.name


NOT_AN_IMAGE = b"hello, this is text"
# (what is wrong, CLI arguments, Python: attribute's prompt and options, HTTP: prompt and fields)
MISTAKES = [
    ("per_source not a number", ["--per-source", "abc"], {"per_source": "abc"}),
    ("aggregation not a choice", ["--aggregation", "foo"], {"aggregation": "foo"}),
    ("mode not a choice", ["--mode", "foo"], {"mode": "foo"}),
    ("adaptive not a yes/no", None, {"adaptive": "maybe"}),
    ("max_cost below 0", ["--max-cost", "-1"], {"max_cost": -1.0}),
    ("per_source above its bound", ["--per-source", "65"], {"per_source": 65}),
    ("unknown source", ["--sources", "nope"], {"sources": "nope"}),
]


def _python_error(call) -> tuple[str, int, int, str]:
    with pytest.raises(engine.UserError) as caught:  # every input mistake is a UserError subclass
        call()
    kind = kind_of(caught.value)
    assert kind is not None
    return kind.code, kind.exit_code, kind.status, message_of(caught.value)


def _http_error(response) -> tuple[str, int, str]:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]["code"], response.status_code, body["error"]["message"]


@pytest.mark.parametrize("what,flags,options", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_bad_option_is_one_error_in_every_layer(store, api, image, capsys, what, flags, options):
    def python():
        with engine.open(store) as ws:
            ws.attribute(image, prompt=PROMPT, options=Options(**options))

    code, exit_code, status, message = _python_error(python)
    if flags is not None:  # a yes/no flag takes no value on the command line (--adaptive / --no-adaptive)
        assert _cli(capsys, "attribute", image, "--prompt", PROMPT, "--store", store, *flags) == (
            exit_code, {"error": message, "kind": code, "exit_code": exit_code})
    assert _http_error(_http(api, image, PROMPT, options)) == (code, status, message)


def test_a_bad_input_is_one_error_in_every_layer(store, api, image, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_bytes(NOT_AN_IMAGE)
    for path, prompt, expected in ((image, "  \t ", "empty_prompt"), (text, PROMPT, "undecodable_image")):
        def python(path=path, prompt=prompt):
            with engine.open(store) as ws:
                ws.attribute(path, prompt=prompt)

        code, exit_code, status, message = _python_error(python)
        assert code == expected
        assert _cli(capsys, "attribute", path, "--prompt", prompt, "--store", store) == (
            exit_code, {"error": message, "kind": code, "exit_code": exit_code})
        # HTTP names an upload by its file name, never a path of the client's machine
        assert _http_error(_http(api, path, prompt, {})) == (code, status, message.replace(str(path), path.name))


def test_every_option_reaches_every_layer_with_one_default():
    from engine.cli import build_parser

    declared = {f.name: f.default for f in fields(Options)}
    assert set(OPTION_FIELDS) == set(declared)  # each is an HTTP field ...
    properties = schema()
    assert {name: properties[name].get("default") for name in declared} == declared  # ... documented with its default
    assert Options.from_strings({}) == Options()  # no field: the declared defaults
    parser = build_parser()
    for command in (["attribute", "x.png"], ["triage", "folder", "--out", "o"]):  # ... a flag of each that attributes
        args, _ = parser.parse_known_args(command)
        assert all(getattr(args, name) is None for name in declared), command  # the CLI adds no default of its own
        assert from_args(args) == Options()
    args, _ = parser.parse_known_args(["attribute", "x.png", *_flags({"per_source": 2, "adaptive": False,
                                                                      "sources": "b,a", "max_cost": 0.5})])
    assert from_args(args) == Options.from_strings({"per_source": "2", "adaptive": "false", "sources": "b,a",
                                                    "max_cost": "0.5"}) == Options(per_source=2, adaptive=False,
                                                                                   sources=("a", "b"), max_cost=0.5)


def test_a_read_only_store_is_one_error_in_every_layer_without_the_servers_path(store, tmp_path, capsys):
    """A write asked of a store on a read-only mount: exit 5, StoreReadOnly, 503 `read_only`, one message;
    the HTTP one names the store's folder, not where it lies on the server (a copy, mounted read-only)."""
    import os

    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    copy, view = tmp_path / "copy", tmp_path / "view"
    shutil.copytree(store, copy)
    view.mkdir()
    for step in (["mount", "--bind", str(copy), str(view)], ["mount", "-o", "remount,bind,ro", str(view)]):
        if subprocess.run(step, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(view)], capture_output=True)
            pytest.skip(f"this machine refuses `{' '.join(step[:3])}`")
    try:
        with engine.open(view) as ws:
            name = ws.list_sources()[0]["name"]
            with pytest.raises(Exception) as caught:
                ws.remove_source(name)
        kind = kind_of(caught.value)
        assert kind is not None and (kind.code, kind.exit_code, kind.status) == ("read_only", 5, 503)
        message = message_of(caught.value)
        assert _cli(capsys, "source", "remove", name, "--store", view) == (
            5, {"error": message, "kind": "read_only", "exit_code": 5})
        with TestClient(create_app(Service.open(view, Limits())), raise_server_exceptions=False) as client:
            code, status, said = _http_error(client.delete(f"/v1/sources/{name}"))
        assert (code, status) == ("read_only", 503) and str(tmp_path) not in said
        assert said == message.replace(str(view), view.name)
    finally:
        if subprocess.run(["umount", str(view)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(view)], capture_output=True)


def test_an_empty_prompt_among_several_is_named_where_it_is(store, api, image, tmp_path, capsys):
    """The library's words, prefixed by where: the line of a --queries file, the place of an HTTP prompt."""
    with pytest.raises(engine.UserError) as caught:
        with engine.open(store) as ws:
            ws.attribute([image, image], prompt=[PROMPT, " "])
    said = message_of(caught.value)
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"image": str(image), "prompt": PROMPT}) + "\n"
                       + json.dumps({"image": str(image), "prompt": " "}) + "\n")
    assert _cli(capsys, "attribute", "--queries", queries, "--store", store) == (
        2, {"error": f"{queries}:2: {said}", "kind": "empty_prompt", "exit_code": 2})
    response = api.post("/v1/attribute", files=[("image", ("a.png", image.read_bytes(), "image/png"))] * 2,
                        data={"prompt": [PROMPT, " "]})
    assert _http_error(response) == ("empty_prompt", 400, f"prompt 2: {said}")


def test_sources_and_stats_are_one_answer_less_the_servers_paths(store, api, capsys):
    with engine.open(store, writable=False) as ws:
        rows, stats = ws.list_sources(), ws.stats()
    assert _cli(capsys, "source", "list", "--store", store) == (0, rows)
    assert [list(row) for row in rows] == [["name", "kind", "path", "fingerprint", "params"]] * len(SOURCES)
    assert api.get("/v1/sources").json() == {"sources": [{k: v for k, v in r.items() if k != "path"} for r in rows]}
    assert _cli(capsys, "stats", "--store", store) == (0, stats)
    stats.pop("store")
    stats["search"].pop("path", None)
    assert api.get("/v1/stats").json()["store"] == stats
    # removing a source the store lacks: one error from each (a UserError from Python: it was the store's own type)
    with pytest.raises(engine.UserError) as caught:
        with engine.open(store) as ws:
            ws.remove_source("nope")
    kind, message = kind_of(caught.value), message_of(caught.value)
    assert kind is not None and kind.code == "unknown_source"
    assert _cli(capsys, "source", "remove", "nope", "--store", store) == (
        kind.exit_code, {"error": message, "kind": kind.code, "exit_code": kind.exit_code})
    assert _http_error(api.delete("/v1/sources/nope")) == (kind.code, kind.status, message)


def test_an_option_given_twice_is_refused_by_the_cli_as_by_http(store, api, image, capsys):
    """Only the last would count (a list of sources silently cut to one): both refuse, in the same words."""
    code, error = _cli(capsys, "attribute", image, "--prompt", PROMPT, "--store", store,
                       "--sources", SOURCES[0], "--sources", SOURCES[1])
    assert (code, error["kind"]) == (2, "bad_option")
    response = api.post("/v1/attribute", files={"image": ("a.png", image.read_bytes(), "image/png")},
                        data={"prompt": PROMPT, "sources": list(SOURCES)})
    assert _http_error(response) == ("bad_option", 400, error["error"])


@pytest.mark.parametrize("argv,body", [
    (["--kind", "nokind"], {"kind": "nokind", "path": "x"}),
    (["--api", "https://images.example.org", "--model", "m", "--protocol", "nope"],
     {"url": "https://images.example.org", "model": "m", "protocol": "nope"})], ids=["kind", "protocol"])
def test_a_source_declaration_outside_its_choices_is_one_message(store, api, capsys, argv, body):
    """`source add` and POST /v1/sources read a declaration with one code (engine.flags): the same line (422 is
    the route's documented status for every declaration mistake)."""
    code, error = _cli(capsys, "source", "add", "x", *argv, "--store", store)
    assert code == 2 and error["kind"] == "bad_request"
    assert _http_error(api.post("/v1/sources", json={"name": "x", **body})) == ("invalid_source", 422, error["error"])


def test_the_servers_own_bound_is_said_as_options_say_theirs(api, image):
    """per_source 17 is an option's value (1-64) beyond this server's --max-per-source (16): refused as such."""
    assert _http_error(_http(api, image, PROMPT, {"per_source": 17})) == (
        "bad_option", 400, "per_source (--per-source) must be at most 16 on this server (its --max-per-source)")


def test_every_form_of_an_image_python_takes_answers_as_its_file(store, image):
    """A path (str or Path), its bytes (bytes, bytearray, memoryview), the file object (opened "rb", BytesIO),
    a list or a generator of them: the one answer of the file. A memoryview and a file object were iterated
    as lists (of ints, of the PNG's "lines") and failed as many nonsense images; a PIL image in any mode
    Pillow turns into RGB answers, and mode La (which it cannot) is one line, not Pillow's ValueError."""
    import io
    import os
    import threading
    import time

    import numpy as np
    from PIL import Image

    from engine.attribute import Query

    data = image.read_bytes()

    def scores(report):
        return [[(s.source, round(s.score, 6)) for s in result.scores] for result in report.results]

    with engine.open(store) as ws, open(image, "rb") as handle:
        ask = lambda images: ws.attribute(images, prompt=PROMPT, options=Options(**OPTIONS))  # noqa: E731
        readable, writable = os.pipe()  # an unbuffered pipe answers a read with what has arrived so far

        def feed() -> None:
            os.write(writable, data[:100])
            time.sleep(0.2)
            os.write(writable, data[100:])
            os.close(writable)

        threading.Thread(target=feed, daemon=True).start()
        pipe = os.fdopen(readable, "rb", buffering=0)
        forms = [image, str(image), data, bytearray(data), memoryview(data), handle, io.BytesIO(data), pipe,
                 Query.read(image, PROMPT)]  # a Query has a `read` too: it is not a file object
        picture = Image.open(image).convert("RGB")
        pictures = [picture.convert(mode) for mode in ("1", "L", "LA", "P", "RGBA", "CMYK", "I", "F", "YCbCr")]
        pictures[3].info["transparency"] = 0  # P with a transparent colour
        pictures.append(Image.fromarray(np.asarray(picture.convert("L"), dtype=np.uint16) * 257))  # I;16
        assert pictures[-1].mode == "I;16"
        report = ask(iter(forms + pictures))  # a generator, read once; one batch, one CLIP forward
        answers = scores(report)
        assert answers[0] and answers[: len(forms)] == [answers[0]] * len(forms)
        assert len(answers) == len(forms) + len(pictures)
        from engine.arguments import image_items

        assert image_items(np.array([str(image)], dtype=object)) == [image]  # a column of paths is a list of them
        with pytest.raises(engine.UserError, match="an array or tensor: pass PIL.Image.fromarray"):
            ask(np.asarray(picture))  # pixels: their layout (HWC or CHW, 0-1 or 0-255) is the caller's to say
        with pytest.raises(engine.UserError, match="mode La, which Pillow cannot convert") as caught:
            ask([picture, picture.convert("LA").convert("La")])
        assert kind_of(caught.value).status == 415
        for encoding in ("utf-8", "latin-1"):  # a PNG fails to decode as UTF-8, and decodes as Latin-1
            with pytest.raises(engine.UserError, match="binary mode"), open(image, encoding=encoding) as text:
                ask(text)
        with Image.open(image) as lazy:  # used after its block: a bare AssertionError from inside Pillow
            pass
        with pytest.raises(engine.UserError, match=r"images\[1\]: cannot read the PIL image") as caught:
            ask([picture, lazy])
        assert kind_of(caught.value).code == "undecodable_image"
        with pytest.raises(engine.UserError, match=r"images\[0\] is an empty path"):
            ask("")  # read as ".", "a folder, not an image file"


def test_python_mistakes_are_one_line_user_errors(store, image, tmp_path, capsys):
    """What a caller gets wrong from Python is an engine.UserError in one line, as the CLI's: an option passed to
    `attribute` as a keyword, a path to `embed`, a workspace used after its `with` block (it silently reopened
    the database), a store path that is a file or missing, a source the store lacks (the store's own errors
    escaped `except engine.UserError`)."""
    with engine.open(store) as ws:
        with pytest.raises(engine.UserError, match=re.escape("pass options=engine.Options(per_source=...)")):
            ws.attribute(image, prompt=PROMPT, per_source=1)
        with pytest.raises(engine.UserError, match="must be a PIL image"):
            ws.embed([str(image)])  # was a TypeError from torchvision
        with pytest.raises(engine.UserError, match="must be an engine.attribute.Query"):
            ws.describe([str(image)])  # was an AttributeError
        with pytest.raises(engine.UserError, match="image_id must be an int"):
            ws.image_file("1")  # was None, as for an id the store lacks
        with pytest.raises(engine.UserError, match="unknown source 'nope'") as caught:
            ws.remove_source("nope")
        assert kind_of(caught.value).code == "unknown_source"
    ws.close()  # a second close does nothing
    for call in (lambda: ws.attribute(image, prompt=PROMPT), ws.list_sources, ws.stats, ws.__enter__,
                 lambda: ws.image_file(1), lambda: ws.calibration, lambda: ws.describe([]), ws.calibration_stale):
        with pytest.raises(engine.UserError, match="is closed") as caught:
            call()
        assert isinstance(caught.value, ValueError) and kind_of(caught.value).status == 503
    (tmp_path / "file").write_text("not a store")
    for path in (tmp_path / "file", tmp_path / "missing"):
        code, exit_code, status, message = _python_error(lambda path=path: engine.open(path))
        assert message.startswith(f"no store at {path}") and ("it is a file" in message) == (path.name == "file")
        assert _cli(capsys, "stats", "--store", path) == (exit_code, {"error": message, "kind": code,
                                                                    "exit_code": exit_code})
