"""The command line as a newcomer meets it: global options anywhere, errors in the form asked for, the
usage of the command that was wrong, paths as a shell would expand them, every OS refusal in one line."""
from __future__ import annotations

import errno
import json
import shlex
import sqlite3

import pytest

from engine.cli import originals_only
from engine.errors import ENVIRONMENT_EXIT, kind_of, message_of
from engine.flags import GLOBAL_OPTIONS
from engine.paths import expand_path
from tests.helpers import run_cli


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


def test_global_options_before_or_after_the_command(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    for argv in (("--store", missing, "stats"), ("stats", "--store", missing),
                 ("--store", missing, "source", "list"), ("source", "--store", missing, "list"),
                 ("source", "list", "--store", missing), ("--json", "stats", "--store", missing)):
        assert run_cli(*argv) == 2, argv
        err = _err(capsys)
        assert "invalid choice" not in err and f"no store at {missing}" in err, (argv, err)
    # an option after the command wins over none before it, and a value before it is kept
    from engine.cli import build_parser

    args, _ = build_parser().parse_known_args(["--store", "A", "--quiet", "stats"])
    assert args.store == "A" and args.quiet and not args.json
    args, _ = build_parser().parse_known_args(["stats", "--store", "B", "--json"])
    assert args.store == "B" and args.json and not args.quiet
    capsys.readouterr()
    _help_of("stats")
    sub = capsys.readouterr().out
    assert all(flag in build_parser().format_help() and flag in sub for flag, _ in GLOBAL_OPTIONS)
    _help_of("attribute")
    said = " ".join(capsys.readouterr().out.split())
    assert "up to K (default on)" in said and "(default True)" not in said  # a switch's default in words


def test_no_store_says_where_the_store_a_newcomer_meant_is(tmp_path, monkeypatch, capsys):
    """A forgotten --store, or the demo's folder given for its store, was answered "create one with `resynth
    init`" (which then refuses the demo's folder): the line names the store that is there instead."""
    (tmp_path / "resynth-demo" / "store").mkdir(parents=True)
    (tmp_path / "resynth-demo" / "store" / "store.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RESYNTH_STORE", raising=False)
    assert run_cli("stats") == 2
    err = _err(capsys)
    assert "no --store was given and $RESYNTH_STORE is unset" in err and "stores here: resynth-demo/store" in err
    assert run_cli("--json", "source", "list", "--store", "resynth-demo") == 2
    said = json.loads(_err(capsys))
    assert said["error"].endswith("but one in it: give --store resynth-demo/store"), said
    assert run_cli("stats", "--store", "elsewhere") == 2  # a store named on purpose: no guess about others
    assert _err(capsys) == f"resynth: error: no store at {tmp_path / 'elsewhere'} (create one with `resynth init`)"


def test_a_misspelt_store_or_a_relative_store_variable_read_elsewhere_says_so(tmp_path, monkeypatch, capsys):
    """`--store resynth-demo/stor`, and the README's `export RESYNTH_STORE=resynth-demo/store` followed by a `cd`,
    were answered "create one with `resynth init`": a new empty store was not what was meant."""
    (tmp_path / "resynth-demo" / "store").mkdir(parents=True)
    (tmp_path / "resynth-demo" / "store" / "store.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RESYNTH_STORE", raising=False)
    assert run_cli("stats", "--store", "resynth-demo/stor") == 2
    assert _err(capsys).endswith("did you mean --store resynth-demo/store? (or create one with `resynth init`)")
    monkeypatch.setenv("RESYNTH_STORE", "resynth-demo/store")
    monkeypatch.chdir(tmp_path / "resynth-demo")
    assert run_cli("--json", "source", "list") == 2
    said = json.loads(_err(capsys))["error"]
    assert "$RESYNTH_STORE is the relative path resynth-demo/store" in said and "full path" in said, said
    monkeypatch.setenv("RESYNTH_STORE", str(tmp_path / "nowhere"))  # a full path: nothing to add
    assert run_cli("stats") == 2
    assert _err(capsys) == f"resynth: error: no store at {tmp_path / 'nowhere'} (create one with `resynth init`)"


def test_ingest_warns_of_a_replay_source_left_with_originals_only(models, tmp_path, capsys):
    """A mistyped source on one manifest row made a replay source that no answer scores, and nothing said so."""
    import numpy as np
    from PIL import Image

    rows = ["image,source,description,role"]
    for i, (source, role) in enumerate((("alpha", "original"), ("alpha", "resynthesis"), ("alpah", "original"))):
        pixels = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{source},a red fox,{role}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    store = tmp_path / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], "--quiet") == 0
    capsys.readouterr()
    assert run_cli("--json", "ingest", tmp_path / "m.csv", "--store", store, "--quiet") == 0
    said = capsys.readouterr()
    warnings = json.loads(said.out)["warnings"]
    assert len(warnings) == 1 and warnings[0] in said.err, warnings
    assert "'alpah' holds originals but no resyntheses" in warnings[0] and "typo of 'alpha'" in warnings[0]
    # the command given removes from this store (it named none: the default store), a name with a space quoted
    assert f"`resynth source remove alpah --store {shlex.quote(str(store))}`" in warnings[0], warnings[0]
    said = originals_only({"sources": {"my fox": {"resyntheses": 0}}}, ["my fox"], ["my fix"])
    assert "`resynth source remove 'my fox'`" in said[0], said
    for argv in (("source", "remove", "alphq"),
                 ("attribute", tmp_path / "0.png", "--prompt", "a", "--sources", "alhpa")):
        assert run_cli(*argv, "--store", store) == 2  # a mistyped source is answered with the one meant
        assert _err(capsys).endswith("(known: alpah, alpha); did you mean 'alpha'?"), argv
    from index.keys import known_names  # hundreds of sources: a dozen named, the hint still on screen

    assert known_names(f"s{i:03}" for i in range(300)).endswith("s011, and 288 more (`resynth source list`)")
    pipeline = next(iter(models["pipelines"].values()))
    for _ in range(2):  # the same line twice (a script rerun): was "a second name would share its resyntheses"
        run_cli("source", "add", "p", pipeline, "--steps", 2, "--guidance", 7, "--store", store, "--quiet")
    assert _err(capsys).endswith("resynth: error: source 'p' already exists (remove it first to change it)")
    api = ("--api", "http://127.0.0.1:9", "--store", store, "--json")
    # a --price 0 given (a self-hosted API) is no missing price: it was warned of as one
    for name, price, warned in (("free", (), True), ("paid", ("--price", "0.04"), False),
                                ("local", ("--price", "0"), False)):
        assert run_cli("source", "add", name, "--model", name, *api, *price) == 0  # no --price: no --max-cost
        assert ("has no --price: --max-cost counts its images as free" in capsys.readouterr().err) == warned, name
    for name in ("caf\u00e9", "cafe\u0301"):  # typed again in another Unicode form (macOS): the same name
        run_cli("source", "add", name, "--model", "m", *api, "--price", "0")
    assert "already exists (remove it first to change it)" in _err(capsys)  # was: "a second name would share"
    assert run_cli("calibrate", "--false-reject", 5, "--store", store) == 2  # meant 5%
    assert _err(capsys).endswith("--false-reject is a fraction between 0 and 1, not 5 (5% is 0.05)")
    assert run_cli("verify", "--repair", "--store", store) == 0  # a sound store: its rebuild is no repair
    said = capsys.readouterr().out
    assert ": ok\n  done: index rebuilt" in said and "repaired" not in said, said


def test_a_second_demo_on_a_running_demos_folder_is_refused_untouched(tmp_path, capsys):
    """Started from another terminal, it deleted the store and models the first run was using."""
    import fcntl
    import os

    running = tmp_path / "resynth-demo"
    (running / "store").mkdir(parents=True)
    (running / ".resynth-demo").write_text("made by resynth demo\n")
    held = os.open(running, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the running demo holds it
        assert run_cli("demo", "--workdir", running, "--quiet") == 2
    finally:
        os.close(held)
    assert _err(capsys) == (f"resynth: error: another `resynth demo` is running in {running}: let it finish, or "
                            "give another --workdir")
    assert (running / "store").is_dir()
    import sqlite3
    import subprocess
    import sys

    sqlite3.connect(running / "store" / "metadata.sqlite").execute("PRAGMA journal_mode=WAL").close()
    served = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                               "c.execute('SELECT 1 FROM sqlite_master').fetchall(); print(1, flush=True); input()",
                               str(running / "store" / "metadata.sqlite")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:  # a server of the demo's store: the rerun deleted it under the server
        served.stdout.readline()
        assert run_cli("demo", "--workdir", running, "--quiet") == 2
    finally:
        served.communicate(b"\n", timeout=30)
    assert "is open in another process (a `resynth serve` of the demo's store?)" in _err(capsys)
    assert (running / "store" / "metadata.sqlite").is_file()
    (tmp_path / "a-file").write_text("")
    assert run_cli("demo", "--workdir", tmp_path / "a-file") == 2
    assert _err(capsys).endswith("a-file is a file: give a new or empty folder")


def _help_of(*command: str) -> str:
    from engine.cli import main

    with pytest.raises(SystemExit):
        main([*command, "--help"])
    return ""


def test_json_errors_are_one_object_on_stderr(tmp_path, capsys):
    assert run_cli("stats", "--store", tmp_path / "none", "--json") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error = json.loads(captured.err)
    assert set(error) == {"error", "kind", "exit_code"} and error["exit_code"] == 2
    assert error["error"].startswith("no store at")
    # a usage mistake too: JSON, with the command's own name
    with pytest.raises(SystemExit) as stop:
        run_cli("source", "list", "--bogus", "--json")
    assert stop.value.code == 2
    error = json.loads(capsys.readouterr().err)
    assert error["kind"] == "usage" and "--bogus" in error["error"] and "resynth source list" in error["error"]
    assert set(error) == {"error", "kind", "exit_code"} and error["exit_code"] == 2  # the same three keys


def test_a_bad_flag_prints_the_usage_of_its_subcommand(capsys):
    for argv, usage in ((("stats", "--bogus"), "usage: resynth stats"),
                        (("source", "add", "x", "--stepz", "3"), "usage: resynth source add"),
                        (("attribute", "--per-sourse", "3"), "usage: resynth attribute")):
        # (a bad option value, `--per-source many`, is the bad_option error of every layer: tests/test_parity.py)
        with pytest.raises(SystemExit) as stop:
            run_cli(*argv)
        assert stop.value.code == 2
        err = _err(capsys)
        assert err.startswith(usage) and "invalid choice" not in err, err


def test_paths_are_expanded_like_a_shell_would(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RESYNTH_TEST_DIR", str(tmp_path / "sub"))
    assert expand_path("~/x") == tmp_path / "x"
    assert expand_path("$RESYNTH_TEST_DIR/y") == tmp_path / "sub" / "y"
    assert expand_path("${RESYNTH_TEST_DIR}/y") == tmp_path / "sub" / "y"
    assert expand_path(None) is None and str(expand_path("rel/z")) == "rel/z"
    # quoted on the command line (the shell left it alone), and in $RESYNTH_STORE
    assert run_cli("stats", "--store", "~/my-store") == 2
    assert f"no store at {tmp_path / 'my-store'}" in _err(capsys)
    assert run_cli("stats", "--store=$RESYNTH_TEST_DIR/s") == 2
    assert f"no store at {tmp_path / 'sub' / 's'}" in _err(capsys)
    monkeypatch.setenv("RESYNTH_STORE", "~/env-store")
    assert run_cli("stats") == 2
    assert f"no store at {tmp_path / 'env-store'}" in _err(capsys)
    assert run_cli("init", "--clip-model", "ViT-B-32", "--clip-checkpoint", "~/ckpt.bin", "--store", "~/s") == 2
    assert f"CLIP checkpoint not found: {tmp_path / 'ckpt.bin'}" in _err(capsys)


def test_the_device_flag_is_checked_before_anything_loads(tmp_path, capsys):
    assert run_cli("stats", "--store", tmp_path, "--device", "gpu0") == 2
    assert "--device must be cpu, cuda, cuda:N or mps" in _err(capsys)


def _os_error(code: int, path: str = "/srv/store/metadata.sqlite") -> OSError:
    return OSError(code, __import__("os").strerror(code), path)


@pytest.mark.parametrize("exc, exit_code, status, code", [
    (_os_error(errno.ENOSPC), ENVIRONMENT_EXIT, 507, "storage_full"),
    (_os_error(errno.EDQUOT), ENVIRONMENT_EXIT, 507, "storage_full"),
    (_os_error(errno.EROFS), ENVIRONMENT_EXIT, 503, "read_only"),
    (PermissionError(errno.EACCES, "Permission denied", "/srv/store"), ENVIRONMENT_EXIT, 503, "permission_denied"),
    (_os_error(errno.EIO), ENVIRONMENT_EXIT, 503, "io_error"),
    (_os_error(errno.EMFILE), ENVIRONMENT_EXIT, 503, "too_many_open_files"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp"), 2, 400, "is_a_directory"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/etc/passwd/x"), 2, 400, "not_a_directory"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/gone"), 2, 404, "not_found"),
    (UnicodeDecodeError("utf-8", b"caf\xe9", 3, 4, "invalid continuation byte"), 2, 400, "not_utf8"),
])
def test_every_os_refusal_is_one_line_with_a_kind(exc, exit_code, status, code):
    kind = kind_of(exc)
    assert kind is not None and (kind.exit_code, kind.status, kind.code) == (exit_code, status, code)
    text = message_of(exc)
    assert "\n" not in text and "Errno" not in text and text
    if exit_code == ENVIRONMENT_EXIT:
        assert getattr(exc, "filename", "") in text  # the CLI names the path ...
        assert "/srv" not in message_of(exc, paths=False)  # ... an HTTP client is not told the server's


def test_database_refusals_and_wrapped_causes_are_classified():
    from index.errors import StoreDamaged, StoreError

    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode, full.sqlite_errorname = 13, "SQLITE_FULL"
    assert kind_of(full).code == "storage_full"
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = 5
    assert kind_of(locked).code == "store_locked" and "lock" in message_of(locked)
    readonly = sqlite3.OperationalError("attempt to write a readonly database")
    readonly.sqlite_errorcode = 8 | (1 << 8)  # an extended code: SQLITE_READONLY_RECOVERY
    assert kind_of(readonly).code == "read_only"

    class DiskFull(Exception):  # as psycopg's errors carry their SQLSTATE
        sqlstate = "53100"
    assert kind_of(DiskFull("could not extend file")).code == "storage_full"
    # a store error caused by what the machine refused is that, not "damaged"
    try:
        try:
            raise _os_error(errno.EROFS)
        except OSError as cause:
            raise StoreError("cannot write the store") from cause
    except StoreError as wrapped:
        assert kind_of(wrapped).code == "read_only" and kind_of(wrapped).exit_code == ENVIRONMENT_EXIT
        assert "read-only" in message_of(wrapped)
    # the store's own full-disk line already says the way out: not said twice
    from pathlib import Path

    from index.failures import full as full_disk
    line = message_of(full_disk(Path("/srv/store"), "writing metadata.sqlite"))
    assert line.count("free some space") == 1 and "no space left" in line
    assert kind_of(StoreDamaged("x")).code == "store_damaged"
    # bugs keep their traceback
    for bug in (RuntimeError("x"), KeyError("k"), OSError("no errno"), sqlite3.ProgrammingError("x")):
        assert kind_of(bug) is None, bug


def test_an_os_refusal_ends_the_cli_in_one_line_with_exit_5(monkeypatch, tmp_path, capsys):
    import engine.cli as cli

    def full(args):
        raise _os_error(errno.ENOSPC, str(tmp_path / "vectors.faiss"))
    monkeypatch.setattr(cli, "cmd_stats", full)
    assert cli.main(["stats", "--store", str(tmp_path)]) == ENVIRONMENT_EXIT
    err = _err(capsys)
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("resynth: error: No space left on device: ") and "free some space" in err
    assert cli.main(["stats", "--json", "--store", str(tmp_path)]) == ENVIRONMENT_EXIT
    assert json.loads(_err(capsys))["kind"] == "storage_full"


def test_quiet_silences_the_model_libraries_bars_without_importing_them():
    """--quiet reaches diffusers', transformers' and huggingface_hub's own bars (weights loading), and
    `stats --quiet` still imports none of them (nor torch)."""
    import subprocess
    import sys

    script = """
import sys
from engine.cli import quiet_libraries
quiet_libraries()
assert not any(m in sys.modules for m in ("torch", "diffusers", "transformers")), "imported too early"
import diffusers.utils.logging, transformers.utils.logging, huggingface_hub.utils
from tqdm.auto import tqdm
print(diffusers.utils.logging.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled(),
      huggingface_hub.utils.are_progress_bars_disabled(), tqdm(range(3)).disable)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False", "True", "True"], out.stdout
    assert out.stderr == "", out.stderr


def test_the_verdict_line_shows_its_evidence():
    from engine.attribute import Attribution, SourceScore
    from engine.textanswer import plural, verdict_line

    def result(verdict, evidence):
        return Attribution(query="q.png", description="d", description_from="prompt", predicted="sdxl",
                           margin=0.1, scores=[SourceScore("sdxl", 0.41, 3, 0.99)], missing=[],
                           verdict=verdict, evidence=evidence)

    # similarities crowd near 1: shown to 4 decimals, so a score and its threshold never both read "1.00"
    assert verdict_line(result("unknown", {"score": 0.99481, "threshold": 0.99512, "references": 3})) == \
        "unknown source (closest: sdxl, score 0.9948 < threshold 0.9951, 3 references)"
    assert verdict_line(result("known", {"score": 0.61, "threshold": 0.55, "references": 1})) == \
        "sdxl (known source: score 0.6100 >= threshold 0.5500, 1 reference)"
    why = "no calibration: run `resynth calibrate`"
    line = verdict_line(result("uncalibrated", {"score": 0.61, "references": 2, "why": why}))
    assert line == "sdxl (uncalibrated: no calibration: run `resynth calibrate`; score 0.6100, 2 references)"
    # the text answer says what the ranking cannot: a lone source is always named, a caption may be wrong
    alone = result("uncalibrated", {})
    alone.description_from = "caption"
    assert [note.split(" (")[0] for note in alone.notes] == ["one source was scored",
                                                              "the description is the captioner's"]
    assert alone.to_dict()["notes"] == alone.notes  # the JSON answer (CLI, HTTP, the page) carries the same
    alone.calibrated, alone.verdict = True, "unknown"  # calibrated: the note no longer asks to calibrate
    assert "p is 1 by construction" in alone.notes[0] and "calibrate for" not in alone.notes[0]
    alone.scores.append(SourceScore("flux", 0.3, 3, 0.01))
    alone.description_from = "prompt"
    # calibrated "unknown" beside p 0.99: p ranks the enrolled sources only
    assert [n.split(":")[0] for n in alone.notes] == ["p is shared among the enrolled sources only"]
    # a real photograph is "unknown" too in a store calibrated without real references: said, not left to guess
    # (the note read "a generator nobody enrolled, which the verdict suggests made this image" for a camera photo)
    assert "(or no generator: calibrated without real photographs" in alone.notes[0]
    alone.evidence = {"real": {"real": False, "value": -0.2, "threshold": 0.1}}  # the real rule ran: not a photo
    assert alone.notes[0].endswith("which the verdict suggests made this image")
    alone.evidence = {"unread": ["real.npy (missing)"]}  # a store calibrated with photographs whose file is gone:
    assert alone.notes[0].endswith("which the verdict suggests made this image")  # not "calibrated without" them
    assert alone.notes[1].startswith("a calibration file is missing")
    alone.evidence = {}
    # calibrated "known" with a runner-up nearly as likely: a close call, not an attribution to trust
    alone.verdict, alone.scores[0].probability, alone.scores[1].probability = "known", 0.52, 0.41
    assert alone.notes and alone.notes[0].startswith("close call: flux is nearly as likely as sdxl")
    alone.scores[0].probability, alone.scores[1].probability = 0.95, 0.05
    assert alone.notes == []
    alone.calibrated, alone.verdict = False, "uncalibrated"
    assert alone.notes == []
    line = verdict_line(result("unknown", {"score": 0.9, "references": 4, "open_set_score": "mahalanobis_open_set",
                                           "value": -3.2, "threshold": -1.5}))
    assert line == "unknown source (closest: sdxl, mahalanobis_open_set -3.20 < threshold -1.50, 4 references)"
    assert verdict_line(result("none", {})) == "no source could be scored"
    # "real" keeps the open-set decision apart: a rejected closest source reads "<", not ">="
    real = {"score": 0.99, "references": 29, "open_set_score": "mahalanobis", "value": -4782.4, "threshold": -1604.3,
            "real": {"value": 0.008, "threshold": -0.009}, "open_set_verdict": "unknown"}
    assert "closest source sdxl, mahalanobis -4782.40 < threshold -1604.30" in verdict_line(result("real", real))
    assert (plural(1, "reference"), plural(0, "reference"), plural(2, "reference")) == (
        "1 reference", "0 references", "2 references")
    # the p line says why no calibration applies (here: fitted for another mode)
    from engine.attribute import Report
    from engine.textanswer import text_answer

    other = "calibrated in combined mode; this query ran in dataset mode: run `resynth calibrate` with --mode dataset"
    answer = text_answer(Report([result("uncalibrated", {"score": 0.61, "references": 2, "why": other})]))
    assert f"p: a softmax of the scores, not a calibrated probability ({other})" in answer.splitlines()
    hostile = result("known", {"score": 0.61, "threshold": 0.55, "references": 1})
    hostile.query = "cat\u202egnp.exe"  # a right-to-left override: a terminal would show "catexe.png"
    assert text_answer(Report([hostile])).startswith("cat\\u202egnp.exe: ")


def test_source_list_shows_each_recipe_and_the_demo_the_commands_to_reuse_it(tmp_path):
    from engine.demo import reuse_lines
    from engine.recipes import add_command, table

    folder = tmp_path / "my pipe"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler"}')
    rows = [{"name": "sd", "kind": "diffusers", "path": str(folder),
             "params": {"steps": 2, "guidance": 7.0, "size": None, "scheduler": None, "negative_prompt": None}},
            {"name": "dalle3", "kind": "api", "path": "https://api.example/v1/images/generations",  # as stored
             "params": {"url": "https://api.example", "model": "dall-e-3", "size": "1024x1024", "price": 0.04,
                        "rate": 5.0, "api_key_env": "KEY", "concurrency": 2, "timeout": 120.0, "extra": {}}},
            {"name": "published", "kind": "replay", "path": None, "params": {}}]
    text = table(rows).splitlines()
    assert text[0].split() == ["name", "kind", "recipe", "model"]
    assert "steps 2, guidance 7, size pipeline's, scheduler DDIMScheduler (the pipeline's own)" in text[1]
    assert "size 1024x1024, price 0.04, rate 5/min" in text[2]  # the rate with its unit
    assert text[2].endswith("dall-e-3 at https://api.example/v1/images/generations")  # the model, not only the URL
    assert "KEY" not in text[2] and "replays stored images" in text[3]
    from engine.sources.api import Api  # the warning for unset key variables agrees in number

    one = Api().prepare("x", "https://api.example", "m", api_key_env="RESYNTH_UNSET_A").warning
    two = Api().prepare("x", "https://api.example", "m", api_key_env="RESYNTH_UNSET_A",
                        client_id_env="RESYNTH_UNSET_B", protocol="firefly").warning
    assert one == "environment variable RESYNTH_UNSET_A is not set here: set it where resynth runs"
    assert two == ("environment variables RESYNTH_UNSET_A and RESYNTH_UNSET_B are not set here: set them where "
                   "resynth runs")
    command = add_command("sd", str(folder), rows[0]["params"], "my-store")
    assert command == f"resynth source add sd '{folder}' --steps 2 --guidance 7 --store my-store"
    models = {"clip_config": tmp_path / "clip" / "c.json", "clip_checkpoint": tmp_path / "clip" / "w.bin",
              "captioner": tmp_path / "captioner", "pipelines": {"sd": folder}}
    lines = "\n".join(reuse_lines(models, rows[:1], tmp_path / "store",
                                  [{"image": "a.png", "prompt": "a cat", "known": False}], tmp_path / "m.jsonl"))
    assert command in lines and "resynth init --store my-store --clip-config" in lines
    assert f"resynth attribute a.png --prompt 'a cat' --store {tmp_path / 'store'}" in lines
    assert f"resynth calibrate {tmp_path / 'm.jsonl'}" in lines and "resynth serve" in lines


def test_the_calibration_line_names_its_rule_and_warns_of_a_single_source():
    """The default fits one shared threshold (not one per source, as the line used to say), and a calibration
    of one source measures nothing: p is always 1 and no source can be left out."""
    from types import SimpleNamespace

    from engine.calibration import Calibration
    from engine.evaluation.commands import _calibration_line

    ws = SimpleNamespace(root="s")
    shared = Calibration(0.002, {"a": 0.99, "b": 0.98}, True, {"sources": ["a", "b"], "open_set_auroc": 0.9},
                         {"score": "mahalanobis", "threshold": -1604.3})
    line = _calibration_line(ws, shared)
    assert "unknown-source threshold mahalanobis -1604.30 (one for every source; fallback score thresholds for " \
           "2 sources)" in line and "AUROC 0.900" in line and "warning" not in line
    shared.real = {"references": 4, "threshold": -0.009, "measured": {"real_called_real": 1.0,
                                                                       "generated_called_real": 0.025}}
    assert "100.0% of real images called real (each leave-one-out), 2.5% of generated" in _calibration_line(ws, shared)
    one = Calibration(1e-6, {"a": 0.99}, True, {"sources": ["a"]}, {})
    line = _calibration_line(ws, one)
    assert "score thresholds for 1 source;" in line and "AUROC not measured" in line
    assert "warning: one source: its p is 1 whatever the image" in line


def test_the_triage_line_counts_in_words():
    from engine.triage import Summary

    line = Summary("case", "out", images=6, non_images=1, answered=4, duplicates=1, errors=1).line()
    assert line.startswith("triaged 6 images under case: 4 answered, 0 already answered, 1 duplicate, 1 error; "
                           "1 other file skipped"), line
    # the labelled set's usage line and the evaluation report agree in number too ("of 1 sources" before)
    import numpy as np

    from engine.evaluation.report import _sources_text
    from engine.labelled import EvalSet

    empty = np.zeros(0, np.int64)
    one = EvalSet(["a", "b"], np.array([0]), np.array([0]), ["h"], ["a.png"], empty, empty, empty, empty, [], [], ["d"])
    assert one.usage_text() == "used 1 original of 1 source (of 2 candidate sources; none of b); none skipped"
    assert _sources_text({"sources": ["a", "b"], "originals_per_source": {"a": 1, "b": 0}}) == \
        "1 source (of 2 candidate sources)"


def test_option_flags_in_every_spelling_and_command_are_read_and_counted_once(tmp_path):
    """argparse no longer types the option flags (engine.options reads their text): `--per 3` (an abbreviation),
    `--per-source=3` and `--seed=-1` still reach Options typed, and a flag given twice in any two spellings, or
    as --x and --no-x, is refused in every command that takes options (only the last would have counted)."""
    from engine.cli import build_parser
    from engine.options import OptionError, from_args

    parser = build_parser()
    commands = {"attribute": ["x.png"], "triage": [str(tmp_path), "--out", str(tmp_path / "o")],
                "calibrate": [], "resynthesize": ["d.txt"]}
    for command, rest in commands.items():
        read = from_args(parser.parse_args([command, *rest, "--per", "3", "--seed=7"]))
        assert (read.per_source, read.seed) == (3, 7)
        for twice in (["--per-source=3", "--per", "4"], ["--seed", "1", "--seed=1"]):
            with pytest.raises(OptionError, match="given 2 times"):
                from_args(parser.parse_args([command, *rest, *twice]))
        with pytest.raises(OptionError, match="seed .* must be between 0"):
            from_args(parser.parse_args([command, *rest, "--seed", "-1"]))
    with pytest.raises(OptionError, match="'adaptive' given 2 times"):
        from_args(parser.parse_args(["attribute", "x.png", "--adaptive", "--no-adaptive"]))
    assert from_args(parser.parse_args(["attribute", "x.png", "--no-adaptive"])).adaptive is False


def test_ray_flags_without_ray_installed_fail_before_any_work(tmp_path, capsys, monkeypatch):
    """`--ray` without Ray installed was found out after the job had started (a progress bar, then the error)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    listed = tmp_path / "descriptions.txt"
    listed.write_text("a red car\n")
    for argv in (("resynthesize", listed), ("reembed", "--clip-model", "ViT-B-32", "--clip-checkpoint", listed),
                 ("rebuild",)):
        capsys.readouterr()
        assert run_cli(*argv, "--ray", "local", "--store", tmp_path / "no-store") == 2, argv
        captured = capsys.readouterr()
        assert captured.err.strip() == "resynth: error: --ray needs Ray: pip install 'resynth[ray]'", captured


# A Ctrl-C that lands inside a library may come out as that library's own error: pressed while diffusers reads a
# pipeline's weights, about one time in three it is "Unable to load weights from checkpoint file" (an OSError; the
# KeyboardInterrupt is gone from the chain). The driver presses Ctrl-C (a real SIGINT) at that point and raises
# what diffusers raises then.
CTRL_C_IN_LOAD = """
import os, signal, sys
import diffusers.models.modeling_utils as loading
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
read = loading.load_state_dict
def pressed_while_reading(path, *args, **kwargs):
    loading.load_state_dict = read
    try:
        os.kill(os.getpid(), signal.SIGINT)
        return read(path, *args, **kwargs)
    except KeyboardInterrupt:
        raise OSError(f"Unable to load weights from checkpoint file for '{path}' at '{path}'. ") from None
loading.load_state_dict = pressed_while_reading
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_while_a_pipeline_loads_stops_the_command(store_dir, tmp_path):
    """Before, the Ctrl-C became that source's failure: the command went on generating with every other source
    (50 s on 2 busy cores) and answered with exit 0, the source listed as `not scored (... failed)`. With --json
    (the text form of the interrupted line is tested with the CLI's entry point)."""
    import subprocess
    import sys

    from PIL import Image

    from tests.procs import REPO

    query = tmp_path / "query.png"
    Image.new("RGB", (32, 32), (200, 120, 40)).save(query)
    argv = ["attribute", str(query), "--prompt", "a lighthouse on a cliff at dusk", "--store",
            str(store_dir), "--quiet", "--json"]
    done = subprocess.run([sys.executable, "-c", CTRL_C_IN_LOAD, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 130 and done.stdout == "", done
    line = done.stderr.strip()
    assert "\n" not in line, line
    assert json.loads(line)["kind"] == "interrupted"


def test_attribute_help_says_a_photograph_is_named_too(capsys):
    """`attribute --help` said "names the closest enrolled source" and nothing of what a camera photograph gets."""
    with pytest.raises(SystemExit):
        run_cli("attribute", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "whatever made the image (a camera photograph, a generator nobody enrolled)" in text
    assert "`real` only once it was fitted with real photographs" in text


def test_the_top_level_help_points_a_newcomer_to_the_demo(capsys):
    """`resynth` alone listed fifteen commands and the store rule, and nothing said where to begin."""
    assert run_cli() == 2
    assert "New here? `resynth demo` runs the whole method offline" in " ".join(capsys.readouterr().out.split())



def test_no_store_anywhere_near_points_to_the_demo(tmp_path, monkeypatch, capsys):
    """A first command before any store exists was told only `resynth init`, which needs a CLIP checkpoint."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RESYNTH_STORE", raising=False)
    assert run_cli("source", "list") == 2
    assert _err(capsys).endswith("or create a store with `resynth init` (or `resynth demo` for one to try)")


def test_ctrl_c_a_library_turned_into_its_error_stops_a_python_call_too(store_dir, tmp_path, monkeypatch):
    """The CLI knew of the Ctrl-C from its own handler; a Python caller has none, and the call went on with every
    other source and answered. The KeyboardInterrupt the library's error was raised over stops it."""
    import diffusers.models.modeling_utils as loading
    from PIL import Image

    import engine

    read = loading.load_state_dict

    def pressed_while_reading(path, *args, **kwargs):
        monkeypatch.setattr(loading, "load_state_dict", read)
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:  # what diffusers does with one that lands in its read
            raise OSError(f"Unable to load weights from checkpoint file for '{path}' at '{path}'. ") from None

    monkeypatch.setattr(loading, "load_state_dict", pressed_while_reading)
    query = tmp_path / "query.png"
    Image.new("RGB", (32, 32), (200, 120, 40)).save(query)
    with engine.open(store_dir) as ws, pytest.raises(KeyboardInterrupt):
        ws.attribute(query, prompt="a lighthouse on a cliff at dusk, seen from a boat")
