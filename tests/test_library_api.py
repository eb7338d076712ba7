"""The library API is the one way in: the README's example runs, CLI and HTTP answer alike, imports are clean."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import run_cli

REPO = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs(models, originals, tmp_path, monkeypatch):
    """The README's example runs as written, its `~/models/...` paths included: HOME is a folder holding
    the tiny zoo under those names, the dataset and the image sit where the example looks for them. Only
    the CLIP is named by its config (the tiny one is not an open_clip architecture) and steps cut to 2."""
    code = _readme_example()
    name, folder = next(iter(models["pipelines"].items()))
    import shutil

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    config = Path(models["clip_config"])
    for link, target in (("open_clip_pytorch_model.bin", models["clip_checkpoint"]),
                         ("stable-diffusion-xl-base-1.0", folder), (config.name, config)):
        (home / "models" / link).symlink_to(Path(target).resolve())
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    manifest = work / "dataset" / "manifest.csv"  # a dataset folder, its images inside it
    manifest.parent.mkdir(parents=True)
    for i, o in enumerate(originals[:3]):
        shutil.copy(o["image"], manifest.parent / f"{i}.png")
    manifest.write_text("image,source,description,role\n" + "".join(
        f"{i}.png,{o['source']},{o['prompt']},original\n" for i, o in enumerate(originals[:3])))
    shutil.copy(originals[0]["image"], work / "suspicious.png")
    substitutions = {
        'clip_model="ViT-L-14-336"': f'clip_config="~/models/{config.name}"',
        "steps=30": "steps=2",
    }
    for placeholder in ('"~/models/open_clip_pytorch_model.bin"', '"~/models/stable-diffusion-xl-base-1.0"',
                        '"dataset/manifest.csv"', '"suspicious.png"', *substitutions):
        assert placeholder in code, f"README example changed: {placeholder} not found"
    for placeholder, value in substitutions.items():
        code = code.replace(placeholder, value)
    monkeypatch.chdir(work)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    report = namespace["report"]
    assert report.results[0].predicted is not None and report.to_dict()["results"][0]["scores"]
    assert (work / "my-store" / "metadata.sqlite").is_file()
    import engine

    with engine.open("~/../work/my-store", writable=False) as ws:  # `~` in the store path too
        (source,) = [s for s in ws.list_sources() if s["name"] == "sdxl"]
        assert source["path"] == str(Path(folder).resolve()) and "~" not in ws.store.config["embedder"]["checkpoint"]


def _rotated_jpeg(source: Path) -> bytes:
    """The image stored sideways with an EXIF orientation tag (6: rotate 90 degrees to display)."""
    image = Image.open(source).convert("RGB").rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("rotated", [False, True])
def test_cli_and_http_give_the_same_json(store_dir, originals, tmp_path, capsys, rotated):
    from fastapi.testclient import TestClient

    from engine.service.app import create_app
    from engine.service.config import Limits
    from engine.service.core import Service

    query = originals[3]
    data = _rotated_jpeg(query["image"]) if rotated else Path(query["image"]).read_bytes()
    path = tmp_path / ("q.jpg" if rotated else "q.png")
    path.write_bytes(data)
    fields = {"per_source": "1", "aggregation": "max", "sources": "tiny-sd-ddim,tiny-sdxl-dpm,tiny-sd-euler"}
    capsys.readouterr()
    assert run_cli("attribute", path, "--prompt", query["prompt"], "--store", store_dir, "--json", "--quiet",
                   "--per-source", 1, "--aggregation", "max", "--sources", fields["sources"]) == 0
    cli = json.loads(capsys.readouterr().out)
    with TestClient(create_app(Service.open(store_dir, Limits()))) as client:
        reply = client.post("/v1/attribute", files={"image": (path.name, data, "image/jpeg")},
                            data={"prompt": query["prompt"], **fields})
        assert reply.status_code == 200, reply.text
        http = reply.json()
    assert http["cache"] == {"cached": cli["cache"]["generated"] + cli["cache"]["cached"], "generated": 0}
    for payload in (cli, http):
        payload.pop("seconds")
        payload.pop("cache")  # the CLI generated what the server then found cached
        payload["results"][0].pop("query")  # a path on the CLI, the upload's name over HTTP
        for result in payload["results"]:
            result.pop("cached"), result.pop("generated")
            result["margin"] = round(result["margin"], 5)
            for s in result["scores"]:
                s["score"], s["probability"] = round(s["score"], 5), round(s["probability"], 4)
    assert cli["results"] == http["results"]
    if rotated:  # EXIF applied: the sideways file answers like the upright original
        import engine
        from engine.images import read_image

        upright = Image.open(query["image"]).convert("RGB")
        with engine.open(store_dir) as ws:
            read, right, sideways = ws.embed([read_image(path)[0], upright, upright.rotate(90, expand=True)])
        assert float(read @ right) > float(read @ sideways)


def test_import_has_no_side_effects():
    code = ("import os, logging, sys; before = dict(os.environ); root = logging.getLogger(); "
            "state = (root.level, list(root.handlers)); import engine, index, index.store, engine.workspace, "
            "engine.options, engine.attribute; "
            "assert dict(os.environ) == before, set(os.environ) ^ set(before); "
            "assert (root.level, list(root.handlers)) == state; assert 'torch' not in sys.modules; print('clean')")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr


@pytest.mark.parametrize("argv", [
    ["--help"], ["stats"], ["source", "list"], ["source", "remove", "nope"], ["attribute", "--help"],
    ["attribute", "GARBAGE", "--prompt", "x"], ["attribute", "MISSING.png", "--prompt", "x"],
])
def test_cli_answers_without_importing_torch(store_dir, tmp_path, argv):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    argv = [str(garbage) if a == "GARBAGE" else str(tmp_path / a) if a == "MISSING.png" else a for a in argv]
    store = [] if argv[0] == "--help" else ["--store", str(store_dir)]
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "engine.cli", *argv, *store],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode in (0, 2), out.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "diffusers" not in imported and "open_clip" not in imported


def test_index_imports_nothing_from_engine():
    for path in (REPO / "index").glob("*.py"):
        assert not re.search(r"^\s*(from|import) engine", path.read_text(), re.M), path



@pytest.mark.parametrize("listing", ["stale", "re-read"])
def test_a_source_removed_by_another_process_mid_request_drops_out(store_dir, originals, listing, monkeypatch):
    """Another process removes a source after this workspace planned a request: the request still ends,
    the other sources are generated and stored, the removed one is reported as not scored. Both
    orders: the listing still names the source when its images are stored (the database refuses
    them), or it was re-read before its pipeline was looked up."""
    import engine
    import engine.workspace
    from engine import Options

    monkeypatch.setattr(engine.workspace, "SOURCES_TTL", 3600.0)
    text = "a prompt nobody asked before"
    with engine.open(store_dir) as ws:
        plan = ws.plan(Options(adaptive=False, mode="resynthesis", per_source=1))
        names = [s.name for s in plan.sources]
        gone = names[-1]
        with engine.open(store_dir) as other:
            other.remove_source(gone)
        if listing == "re-read":
            ws.sources_changed()
        cached, generated, failed = ws.resynthesize([text], plan)[text]
        assert (cached, generated) == (0, len(names) - 1)
        assert list(failed) == [gone] and "removed" in failed[gone]
        ws.sources_changed()
        report = ws.attribute([originals[0]["image"]], prompt=text,
                              options=Options(adaptive=False, mode="resynthesis", per_source=1))
        assert sorted(s.source for s in report.results[0].scores) == sorted(n for n in names if n != gone)
        assert report.results[0].generated == 0


def test_threads_of_one_process_share_a_workspace(store_dir, originals, tmp_path):
    """The library from a thread pool: every pipeline loaded at once on several threads failed ("Unsupported
    device type 'meta'": diffusers builds modules under a process-wide patch), and two threads claimed the
    same keys as one owner, so both generated them. Now loads take turns, threads single-flight as processes
    do, and the stored images are byte for byte those one thread makes."""
    import sqlite3
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    import engine
    from engine import Options

    names = sorted({row["source"] for row in originals})[:2]
    options = Options(adaptive=False, mode="resynthesis", per_source=1, sources=tuple(names))
    queries = [(row["image"], row["prompt"]) for row in originals[:2]] * 2  # two descriptions, each asked twice
    alone = tmp_path / "alone"
    shutil.copytree(store_dir, alone)
    with engine.open(store_dir) as ws, ThreadPoolExecutor(4) as pool:
        ws.max_loaded = 1  # two pipelines at once while both are busy; after the runs, the quota again
        reports = list(pool.map(lambda q: ws.attribute(q[0], prompt=q[1], options=options), queries))
        assert len(ws.loaded_pipelines()) == 1, ws.loaded_pipelines()
    with engine.open(alone) as ws:
        expected = ws.attribute(queries[0][0], prompt=queries[0][1], options=options)  # one thread, one description
    assert sum(r.generated for r in reports) == 2 * expected.generated == 2 * len(names)
    assert reports[0].results[0].scores == expected.results[0].scores

    def stored(store):
        with sqlite3.connect(store / "metadata.sqlite") as db:
            return dict(db.execute("select key, file_hash from images where role = 'resynthesis'"))
    threaded, alone_made = stored(store_dir), stored(alone)
    assert len(threaded) == 2 * len(alone_made) and all(threaded[key] == made for key, made in alone_made.items())


def test_threads_asking_for_a_source_kind_first_all_get_it():
    """The kinds register on first use: `_loaded` was set before they were, so in a fresh process every
    thread but the first read an empty registry ("unknown source kind 'diffusers' (known: )")."""
    code = ("import threading; from engine import sources; errors = []\n"
            "def ask():\n"
            "    try: sources.get('diffusers')\n"
            "    except Exception as exc: errors.append(repr(exc))\n"
            "threads = [threading.Thread(target=ask) for _ in range(8)]\n"
            "[t.start() for t in threads]; [t.join() for t in threads]; print(errors)")
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr)


def test_a_misspelt_option_or_argument_names_the_nearest_one(tmp_path):
    """`Options(per_sourc=3)` was Python's bare TypeError, naming no option, where the CLI suggests the nearest
    flag; `engine.open(store, writeable=False)` the same. Each is now one line naming the nearest name (a
    UserError for `except engine.UserError`, still a TypeError), refused before anything is opened."""
    import numpy as np

    import engine
    from engine import Options
    from engine.errors import kind_of

    for call, said in ((lambda: Options(per_sourc=3), "unknown option 'per_sourc'; did you mean per_source?"),
                       (lambda: Options().with_changes(max_cots=1.0), "did you mean max_cost?"),
                       (lambda: Options(*range(11)), "give them by name"),
                       (lambda: engine.open(tmp_path / "none", writeable=False),
                        "engine.open() takes no argument 'writeable'; did you mean writable?"),
                       (lambda: engine.init(tmp_path / "none", clip_checkpoint="x", clip_layr="final"),
                        "did you mean clip_layer?"),
                       (lambda: engine.init(tmp_path / "none"), "missing a required argument: 'clip_checkpoint'"),
                       (lambda: engine.init(tmp_path / "none", clip_checkpoint="x", clip_config="y", clip_layer=True),
                        "clip_layer must be")):  # True was block 1
        with pytest.raises(engine.UserError, match=re.escape(said)) as caught:
            call()
        assert isinstance(caught.value, TypeError) and kind_of(caught.value).exit_code == 2
    assert not (tmp_path / "none").exists()
    with pytest.raises(engine.UserError, match="progress must be True or False"):
        engine.open(tmp_path / "none", progress="no")  # truthy: it turned progress bars on
    with pytest.raises(engine.UserError, match=re.escape("unknown field 'promt' (did you mean prompt?)")):
        Options.check_fields(["promt"])  # the HTTP form's unknown field, as the CLI's unknown flag
    # the same values as the CLI and HTTP read them: a float cost (1 was an int in the answer's budget, 1.0
    # from --max-cost 1), and a numpy yes/no read as one
    assert repr(Options(max_cost=1).max_cost) == repr(Options.from_strings({"max_cost": "1"}).max_cost) == "1.0"
    assert repr(Options(max_cost=-0.0).max_cost) == "0.0" and Options(adaptive=np.bool_(False)).adaptive is False


def test_an_async_file_object_is_named_as_such():
    """Starlette's UploadFile reads by coroutine: it was said to "read coroutine, not bytes: open it in binary
    mode" (and Python warned of a coroutine never awaited)."""
    import warnings

    from engine.arguments import _read_file_object
    from engine.errors import ArgumentTypeError

    class Upload:
        async def read(self, size: int = -1) -> bytes:
            return b""

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would be an error here
        with pytest.raises(ArgumentTypeError, match=r"images\[0\] is an async file object: pass `await file.read\(\)`"):
            _read_file_object(Upload(), "images[0]")
