"""What a clumsy or hostile user hands the command line and the library: special files where a file
belongs (a FIFO nobody writes to, /dev/zero, a link loop), a 2 GB file of one line, `--store` at a file or
at a folder of other files, an empty store path, arguments of the wrong type, Ctrl-C. Each is one line and
the right exit code, at once, with nothing written. No model is loaded here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import engine
from engine.errors import ArgumentTypeError, OptionError, UserError
from engine.images import read_image
from engine.manifest import MAX_LINE, read_manifest
from index.store import Store
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
EMBEDDER = {"identity": "test-embedder", "arch": "x", "checkpoint": "x"}


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


def _at_once(call) -> BaseException | None:
    """Run `call` on a thread and give what it raised; fails if it is still running after 10 s (a FIFO
    opened for reading waits for a writer forever)."""
    raised: list[BaseException | None] = [None]

    def run():
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            raised[0] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "blocked (a FIFO opened for reading?)"
    return raised[0]


@pytest.fixture
def specials(tmp_path) -> dict[str, Path]:
    os.mkfifo(tmp_path / "fifo")
    os.symlink("loop-b", tmp_path / "loop-a")
    os.symlink("loop-a", tmp_path / "loop-b")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling")
    big = tmp_path / "sparse.jsonl"
    with open(big, "wb") as handle:  # 2 GB of NUL bytes in no line at all; sparse, so no disk is used
        handle.truncate(2 << 30)
    return {"a named pipe (FIFO)": tmp_path / "fifo", "a loop of symbolic links": tmp_path / "loop-a",
            "a symbolic link to a missing file": tmp_path / "dangling", "a character device": Path("/dev/zero"),
            "a folder": tmp_path, "sparse": big}


def test_special_files_are_refused_in_one_line_and_never_block(specials, tmp_path, capsys):
    big = specials.pop("sparse")
    for why, path in specials.items():
        # the CLI, before any store is opened or model loaded
        assert run_cli("attribute", path, "--prompt", "x", "--store", tmp_path / "none") == 2
        err = _err(capsys)
        assert err.count("\n") == 0 and why in err and str(path) in err, (why, err)
        # the library's reader and the manifest reader: refused at once, not read forever or waited on
        for call in (lambda p=path: read_image(p), lambda p=path: read_manifest(p)):
            raised = _at_once(call)
            assert isinstance(raised, UserError) and why in str(raised), (why, raised)
    # /dev/null is a device too, not an empty image
    raised = _at_once(lambda: read_image("/dev/null"))
    assert isinstance(raised, UserError) and "character device" in str(raised)
    # a 2 GB manifest of one line: refused at its first MiB (it was read whole: 4.3 GB, 7 s)
    raised = _at_once(lambda: read_manifest(big))
    assert isinstance(raised, UserError) and f"longer than {MAX_LINE}" in str(raised)
    assert run_cli("attribute", "--queries", big, "--store", tmp_path / "none") == 2
    assert f"{big}:1: a line longer than" in _err(capsys)
    assert run_cli("attribute", "--queries", specials["a named pipe (FIFO)"], "--store", tmp_path / "none") == 2
    assert "is a named pipe (FIFO), not a JSONL file" in _err(capsys)
    # a name with a newline or bytes that are not UTF-8 is shown as it can be typed, on one line
    for name, shown in (("a\nb.png", "a\\nb.png"), (os.fsdecode(b"\xff.png"), "\\xff.png")):
        assert run_cli("attribute", tmp_path / name, "--prompt", "x", "--store", tmp_path / "none") == 2
        assert f"image not found: {tmp_path}/{shown}" == _err(capsys).removeprefix("resynth: error: ")
    # a model file or folder that is a FIFO or a device: refused before any reader opens (or hashes) it
    Store.create(tmp_path / "s", EMBEDDER, 8).close()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "q.png")
    fifo = specials["a named pipe (FIFO)"]
    for argv in (("source", "add", "a", fifo, "--config", tmp_path), ("source", "add", "b", tmp_path, "--lora",
                 "/dev/zero:0.5"), ("init", "--clip-model", "ViT-B-32", "--clip-checkpoint", fifo),
                 ("attribute", tmp_path / "q.png", "--prompt", "x", "--captioner", fifo)):
        assert run_cli(*argv, "--store", tmp_path / "s") == 2
        err = _err(capsys)
        assert f"{fifo} is a named pipe (FIFO), not a file" in err or "/dev/zero is a character device" in err, err
    # --report over the evidence or the store's database: refused before the work
    query = tmp_path / "q.png"
    for report, why in ((query, "one of the images"), (tmp_path / "s" / "metadata.sqlite", "inside the store")):
        assert run_cli("attribute", query, "--prompt", "x", "--report", report, "--store", tmp_path / "s") == 2
        assert why in _err(capsys)
    # a file name past 255 bytes, in a manifest row and as the manifest: is_file() raised, a traceback
    (tmp_path / "long.jsonl").write_text(json.dumps({"image": "a" * 300 + ".png", "source": "s", "description": "d",
                                                     "role": "original"}) + "\n")
    for manifest in (tmp_path / "long.jsonl", tmp_path / ("b" * 300) / "m.csv"):
        assert run_cli("ingest", manifest, "--store", tmp_path / "s") == 2
        err = _err(capsys)
        assert "(file name too long)" in err and "..." in err and len(err) < 400, err
    # an output the atomic rename would replace (a device as root) or fail on after the work
    for report, why in ((specials["a named pipe (FIFO)"], "is a named pipe"), ("/dev/null", "is a character device"),
                        (tmp_path, "is a folder"), (tmp_path / "fifo" / "r.html", "is not a folder")):
        assert run_cli("attribute", "x.png", "--report", report, "--store", tmp_path / "none") == 2
        assert why in _err(capsys)


def test_init_creates_a_store_only_in_a_new_empty_or_store_folder(specials, tmp_path, capsys):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "metadata.sqlite").write_bytes(b"")  # an init killed before its store.json
    (tmp_path / "file").write_text("x")
    cases = {tmp_path / "project": "holds other files (notes.txt) and no store",
             tmp_path / "file": "it is a file, not a folder",
             specials["a named pipe (FIFO)"]: "it is a named pipe (FIFO), not a folder",
             specials["a symbolic link to a missing file"]: "a symbolic link to a missing file",
             specials["a loop of symbolic links"]: "a loop of symbolic links"}
    for store, why in cases.items():
        before = sorted(os.listdir(tmp_path / "project"))
        assert run_cli("init", "--store", store, "--clip-model", "ViT-B-32", "--clip-checkpoint", "none.bin") == 2
        err = _err(capsys)
        assert why in err and err.count("\n") == 0, err
        assert sorted(os.listdir(tmp_path / "project")) == before  # nothing written among the user's files
    # a new folder, an empty one and a half-made store pass the check (and fail on the next one, the
    # --images URL, checked before any model loads)
    (tmp_path / "empty").mkdir()
    for store in (tmp_path / "new", tmp_path / "empty", tmp_path / "half"):
        assert run_cli("init", "--store", store, "--clip-model", "ViT-B-32", "--clip-checkpoint", "none.bin",
                       "--images", "ftp://x") == 2
        assert "not an object-store URL" in _err(capsys)


def test_an_empty_or_relative_store_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:  # `--store "$UNSET"`: not ./resynth-store in silence
        run_cli("stats", "--store", "")
    assert stop.value.code == 2 and "--store is empty" in _err(capsys)
    monkeypatch.setenv("RESYNTH_STORE", "")  # set but empty: unset, as ${RESYNTH_STORE:-...} reads it
    assert run_cli("stats") == 2 and f"no store at {tmp_path / 'resynth-store'}" in _err(capsys)
    Store.create(tmp_path / "rel", EMBEDDER, 8).close()
    monkeypatch.setenv("RESYNTH_STORE", "rel")
    with engine.open(writable=False) as ws:  # made absolute once: a later chdir or a Ray worker sees the same
        assert ws.root == tmp_path / "rel"
    for empty in ("", b""):
        with pytest.raises(UserError, match="the store path is empty"):
            engine.open(empty)


def test_library_arguments_of_the_wrong_type_fail_at_the_call(tmp_path):
    Store.create(tmp_path / "s", EMBEDDER, 8).close()
    image = tmp_path / "q.png"
    from PIL import Image

    Image.new("RGB", (16, 16)).save(image)
    for bad in (123, ["x"], os.fsencode(tmp_path / "s") + b"\0"):
        with pytest.raises(UserError):
            engine.open(bad)
    with pytest.raises(ArgumentTypeError, match="writable must be True or False"):
        engine.open(tmp_path / "s", writable="no")  # truthy: it opened the store for writing
    with pytest.raises(UserError, match="device must be"):
        engine.open(tmp_path / "s", device="gpu0")
    with engine.open(os.fsencode(tmp_path / "s")) as ws:  # a bytes path, as os functions take
        calls = {
            "images must be": lambda: ws.attribute(None, "x"),
            "images[1] must be": lambda: ws.attribute([image, 5], "x"),
            "prompt must be a str": lambda: ws.attribute(image, b"x"),
            "prompt[0] must be": lambda: ws.attribute([image], [5]),
            "options must be an engine.Options (e.g.": lambda: ws.attribute(image, "x", {"mode": "dataset"}),
            "labels must be a list of str": lambda: ws.attribute(image, "x", labels="ab"),
            "a source name must be a str": lambda: ws.remove_source(None),
            "steps (--steps) of a diffusers source must be an integer": lambda: ws.add_source("a", image, steps=True),
            "manifest is required": lambda: ws.ingest(None),
            "descriptions must be a list of str": lambda: ws.resynthesize_dataset(5),
            "false_reject must be a number": lambda: ws.calibrate(false_reject="5%"),
            "images[0] holds a NUL byte": lambda: ws.attribute(f"{image}\0", "x"),
            # what Python makes of argv bytes that are not UTF-8: the key hash and the SQL driver raised
            "prompt is not valid UTF-8 text (caf\\xe9)": lambda: ws.attribute(image, "caf\udce9"),
            "a source name is not valid UTF-8": lambda: ws.add_source("\udcff", image),
            "repair must be True or False": lambda: ws.verify(repair="no"),  # truthy: it repaired
            "allow_outside must be True or False": lambda: ws.ingest(image, allow_outside="no"),
            "bytes naming a file": lambda: ws.attribute(os.fsencode(image), "x"),
        }
        for words, call in calls.items():
            with pytest.raises(UserError) as raised:
                call()
            assert words in str(raised.value) and "\n" not in str(raised.value), (words, raised.value)
        assert isinstance(raised.value, UserError) and not ws.list_sources()  # nothing was stored
        for params, words in (({"guidance": float("nan")}, "finite"), ({"steps": 10 ** 26}, "between 1 and 10000"),
                              ({"size": 2 ** 40}, "between 8 and 16384"), ({"bogus": 1}, "take no 'bogus'")):
            with pytest.raises(UserError, match=words):
                ws.add_source("a", image, **params)
        with pytest.raises(ArgumentTypeError):  # a TypeError too, as Python code expects
            ws.attribute(object(), "x")
    with pytest.raises(ArgumentTypeError, match="clip_checkpoint .* is required"):
        engine.init(tmp_path / "t", clip_checkpoint=None, clip_model="ViT-B-32")
    assert not (tmp_path / "t").exists()
    import numpy as np

    assert engine.Options(per_source=np.int64(3)).per_source == 3  # numpy integers are integers
    from engine.arguments import texts, unicode

    # an ASCII locale without UTF-8 mode (PYTHONUTF8=0 LC_ALL=C) keeps argv's UTF-8 bytes as surrogates: read
    assert unicode("caf\udcc3\udca9", "prompt") == texts(["caf\udcc3\udca9"], "prompts")[0] == "café"
    for bad in ({"sources": 5}, {"sources": [1, None]}, {"sources": b"a,b"}, {"sources": " , "}):
        with pytest.raises(OptionError, match="sources"):
            engine.Options(**bad)
    with pytest.raises(OptionError, match="unknown option"):
        engine.Options().with_changes(per_sorce=3)
    with pytest.raises(OptionError):
        engine.Options.from_strings(None)  # type: ignore[arg-type]


DRIVER = """
import os, signal, sys
import engine.cli
from engine.cli import main
# as in a terminal: a process started in the background by a shell inherits SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
# a real SIGINT while the parser is being built (it imports the source kinds: a traceback before), sent at that
# point rather than after a delay, so a fast machine cannot finish first
build = engine.cli.build_parser
def interrupted_build():
    os.kill(os.getpid(), signal.SIGINT)
    return build()
engine.cli.build_parser = interrupted_build
sys.exit(main(sys.argv[1:]))
"""


# the console script (`resynth`, engine.console), SIGINT arriving while it imports the command line's modules
DURING_IMPORT = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
class InterruptOnce:  # the first look-up of a module engine.cli imports is where the user's Ctrl-C lands
    def find_spec(self, name, path=None, target=None):
        if name == "engine.flags":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
from engine.console import main
sys.meta_path.insert(0, InterruptOnce())
sys.argv = ["resynth", *sys.argv[1:]]
sys.exit(main())
"""


@pytest.mark.parametrize("driver", [DRIVER, DURING_IMPORT], ids=["in-main", "during-import"])
@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_anywhere_in_main_is_one_line_and_exit_130(tmp_path, as_json, driver):
    argv = ["init", "--store", str(tmp_path / "s"), "--clip-model", "ViT-B-32", "--clip-checkpoint", "none.bin"]
    done = subprocess.run([sys.executable, "-c", driver, *argv, *(["--json"] if as_json else [])], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and done.stdout == "", done
    line = done.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    if as_json:
        assert json.loads(line) == {"error": "interrupted (everything committed so far is kept)",
                                    "kind": "interrupted", "exit_code": 130}
    else:
        assert line == "resynth: interrupted (everything committed so far is kept)"
    assert not (tmp_path / "s").exists()


def test_the_installed_console_script_is_the_guarded_entry():
    """`resynth` as pip installs it runs engine.console:main (Ctrl-C during its imports is one line), and
    answers `--help` as `python -m engine.cli` does."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "resynth"]
    assert script.value == "engine.console:main"
    installed = Path(sys.executable).parent / "resynth"
    if not installed.is_file():
        pytest.skip(f"no console script beside {sys.executable} (not installed with pip)")
    done = subprocess.run([str(installed), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: resynth"), done.stderr


def test_the_reproducing_command_of_a_report_writes_options_as_read():
    """Options are read from their text by the layer below argparse: the command a report prints to
    reproduce the run gives each as read (typed, trimmed, sources in their kept order), not as typed."""
    from engine.casereport import option_words
    from engine.cli import build_parser

    args, _ = build_parser().parse_known_args(["attribute", "x.png", "--seed", " 5", "--sources", "b, a",
                                               "--no-adaptive", "--per-source=3"])
    assert option_words(args) == ["--per-source", "3", "--no-adaptive", "--seed", "5", "--sources", "a,b"]
