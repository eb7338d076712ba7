"""`resynth triage` and the case report: a nested folder in, CSV + JSONL + one self-contained HTML out;
resumable without generating; bad input answered in one line."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from engine import casereport, triage
from engine.options import Options
from tests.helpers import run_cli
from tests.test_store_refusals import mounts  # noqa: F401 - real tmpfs mounts

PROMPT = "portrait of an old man with a beard"
FAST = Options(per_source=1, adaptive=False)
HOSTILE = "<img src=x onerror=alert(1)>.png"


@pytest.fixture
def folder(originals, tmp_path) -> Path:
    """Nested images (one under a hostile name, one duplicate), a text file and an undecodable image."""
    root = tmp_path / "case"
    picks = [originals[0], originals[6], originals[12]]
    (root / "a" / "b").mkdir(parents=True)
    shutil.copy(picks[0]["image"], root / "top.png")
    shutil.copy(picks[1]["image"], root / "a" / "one.png")
    shutil.copy(picks[2]["image"], root / "a" / "b" / HOSTILE)
    shutil.copy(picks[0]["image"], root / "a" / "b" / "same-bytes.png")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / "broken.png").write_bytes(b"these bytes are not a picture")
    return root


@pytest.fixture
def cli_triage(monkeypatch):
    """`resynth triage` on the parser, whether or not engine.cli registers it yet."""
    import engine.cli as cli

    original = cli._extension_commands
    monkeypatch.setattr(cli, "_extension_commands",
                        lambda: [r for r in original() if r is not triage.register] + [triage.register])


def _generated(ws) -> int:
    return sum(ws.generator_calls.values())


def test_triage_writes_a_row_per_image_and_a_self_contained_report(store_dir, folder, tmp_path):
    out = tmp_path / "out"
    with engine.open(store_dir) as ws:
        summary = triage.run(ws, folder, out, PROMPT, FAST, batch=2, progress=False, command="resynth triage X")
        assert summary.generated == _generated(ws) > 0
    # counted per request: top.png and one.png (one batch, one description) made it once, the hostile name's batch
    # reused it once (cached, summed per answer, read twice as many: one.png's copy of its batch's count)
    assert summary.cached == summary.generated
    assert (summary.images, summary.non_images, summary.errors, summary.duplicates) == (5, 1, 1, 1)
    assert summary.answered == 3 and summary.generated > 0
    rows = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    paths = [r["path"] for r in rows]  # the folder's order: the error row was written a batch before the others
    assert paths == ["top.png", "a/broken.png", "a/one.png", f"a/b/{HOSTILE}", "a/b/same-bytes.png"]
    by_path = {r["path"]: r for r in rows}
    assert by_path["a/broken.png"]["verdict"] == "error" and "decode" in by_path["a/broken.png"]["error"]
    good = by_path["top.png"]
    assert good["verdict"] == "uncalibrated" and good["predicted"] and float(good["score"]) > 0
    assert good["description"] == PROMPT and good["description_from"] == "prompt" and len(good["sha256"]) == 64
    assert by_path["a/b/same-bytes.png"]["predicted"] == good["predicted"]
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and all(x["run"] == lines[0]["run"] for x in lines)
    answer = next(x for x in lines if x["path"] == "top.png")["result"]
    assert answer["scores"] and answer["closest"]  # the full answer, evidence ids included
    copy = next(x for x in lines if x["path"] == "a/b/same-bytes.png")  # says whose answer it is, and cost nothing
    assert copy["duplicate_of"] == "top.png" and (copy["result"]["cached"], copy["result"]["generated"]) == (0, 0)

    page = (out / "report.html").read_text(encoding="utf-8")
    assert HOSTILE not in page and html_escaped(HOSTILE) in page  # hostile names are text
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//)""", page)  # nothing fetched from elsewhere
    assert "<script" not in page.replace(html_escaped("<script"), "")
    query_thumbs = page.count("alt='query ")
    assert query_thumbs == 4  # every decodable query is embedded
    evidence = page.count("resynthesis'>")
    assert evidence >= 3 * len(answer["scores"]) - 2  # each scored source's closest resyntheses, as images
    assert page.count("src='data:image/") == query_thumbs + evidence
    for name in ws_sources(store_dir):
        assert name["fingerprint"] in page
    assert "resynth triage X" in page and "embedder" in page and "created (UTC)" in page
    assert "scheduler pipeline&#x27;s" not in page and "Scheduler (the pipeline&#x27;s own)" in page  # as source list
    assert "same bytes as top.png" in page and page.count("note: p: a softmax of the scores, not a calibrated") == 4
    assert re.search(r"· p [01]\.\d{3} · \d+ refs?<", page)  # the references each score rests on, as the CLI
    # an index first, one row per image linking to its case (a 500-image run was 500 cases to scroll through)
    index = re.search(r"<table class='meta index'>.*?</table>", page).group()
    assert "5 queries: 4 uncalibrated, 1 error" in page and index.count("<a href='#q") == 5
    assert [f"id='q{n}'" in page for n in range(1, 6)] == [True] * 5 and html_escaped(HOSTILE) in index
    assert "<span class='badge error'>error</span>" in index and "decode" in index


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def ws_sources(store_dir) -> list[dict]:
    with engine.open(store_dir, writable=False) as ws:
        return [{"name": s.name, "fingerprint": s.fingerprint} for s in ws.sources()]


def test_a_rerun_generates_nothing_and_resumes_an_interrupted_run(store_dir, folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    later = folder / "a" / "b" / HOSTILE
    held = tmp_path / "held.png"
    shutil.move(later, held)  # the first run sees part of the folder, as an interrupted one would
    batches: list[int] = []
    attribute = triage._attribute
    monkeypatch.setattr(triage, "_attribute", lambda ws, pending, *rest: batches.append(len(pending)) or attribute(
        ws, pending, *rest))
    monkeypatch.setattr(triage, "BATCH_PIXELS", 1)  # a batch is cut by pixels too (16 images of 49 MP: 3.9 GB)
    with engine.open(store_dir) as ws:
        first = triage.run(ws, folder, out, PROMPT, FAST, progress=False)
    assert first.answered == 2 and batches == [1, 2]  # broken.png has no pixels by its header: it waits for one
    monkeypatch.undo()
    with open(out / "results.jsonl", "ab") as handle:
        handle.write(b'{"run": "torn line of a crash')  # no newline: killed mid-write
    shutil.move(held, later)
    with engine.open(store_dir) as ws:
        capsys.readouterr()
        second = triage.run(ws, folder, out, PROMPT, FAST, progress=True)
        generated = _generated(ws)
    assert (second.resumed, second.answered, second.duplicates) == (3, 1, 0)  # broken.png is tried again
    bar = capsys.readouterr().err  # resumed, errors and answers each counted once: the bar ends at the total
    assert "triage: 100%" in bar and "5/5" in bar and not re.search(r"\b([6-9]|\d\d+)/5\b", bar)
    assert generated == second.generated  # only the new image's description could need generating
    (folder / "a" / "one.png").unlink()  # gone since: its answer stays, said to be an earlier run's
    with engine.open(store_dir) as ws:
        third = triage.run(ws, folder, out, PROMPT, FAST, progress=False)
        assert _generated(ws) == 0 and third.generated == 0
    assert (third.resumed, third.answered) == (3, 0)
    rows = list(csv.DictReader((out / "results.csv").open(encoding="utf-8")))
    assert len(rows) == 5 and rows[-1]["path"] == "a/one.png"  # one row per image, whatever the number of runs
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("not under the folder at this run") == 1 and page.count("alt='query ") == 3
    with engine.open(store_dir) as ws:  # other options: another key, answered again (from the cache)
        other = triage.run(ws, folder, out, PROMPT, FAST.with_changes(aggregation="mean"), progress=False)
    assert other.answered == 2 and other.resumed == 0


def test_a_batch_that_fails_after_generating_counts_what_it_generated(store_dir, folder, tmp_path, monkeypatch):
    """A batch whose one description failed after another's resyntheses were made (an API refusing one prompt) is
    retried image by image, which found those resyntheses cached: the summary said 0 generated for what was
    generated (and paid for) in this run. The CSV and report are written under the run's lock (a run started
    meanwhile wrote its newer ones, then this one's replaced them)."""
    from engine.errors import SourceError

    for gone in ("a/b", "a/broken.png"):
        shutil.rmtree(folder / gone) if (folder / gone).is_dir() else (folder / gone).unlink()
    with engine.open(store_dir) as ws:
        attribute = ws.attribute

        def fails_after_generating(queries, **kwargs):
            report = attribute(queries, **kwargs)
            if len(queries) > 1:  # the batch: generated, then one of its descriptions failed
                raise SourceError("api", "the prompt was refused")
            return report

        monkeypatch.setattr(ws, "attribute", fails_after_generating)
        refused = []
        write = casereport.write

        def another_run_meanwhile(path, *args, **kwargs):  # the lock was let go before the CSV and report
            with pytest.raises(engine.UserError, match="another `resynth triage`") as caught:
                triage.Results(path.parent / "results.jsonl", "k").close()
            refused.append(caught.value)
            return write(path, *args, **kwargs)

        monkeypatch.setattr(casereport, "write", another_run_meanwhile)
        summary = triage.run(ws, folder, tmp_path / "out", PROMPT, FAST, progress=False)
        assert summary.answered == 2 and summary.generated == _generated(ws) > 0 and len(refused) == 1


def test_bad_input_is_one_line(store_dir, folder, tmp_path, cli_triage, capsys):
    assert run_cli("triage", tmp_path / "nowhere", "--out", tmp_path / "o", "--store", store_dir) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "folder not found" in err
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    assert run_cli("triage", folder, "--out", afile, "--store", store_dir, "--quiet") == 2
    assert "is a file" in capsys.readouterr().err
    code = run_cli("triage", folder, "--out", tmp_path / "o", "--store", store_dir, "--sources", "nope", "--json")
    assert code != 0 and json.loads(capsys.readouterr().err)["kind"] == "unknown_source"
    import fcntl

    (tmp_path / "busy").mkdir()
    with open(tmp_path / "busy" / "results.jsonl", "ab") as held:  # another triage writing that folder now
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run_cli("triage", folder, "--out", tmp_path / "busy", "--store", store_dir, "--quiet") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another `resynth triage` is writing" in err
    assert (tmp_path / "busy" / "results.jsonl").read_bytes() == b""  # nothing answered, nothing written


def test_the_command_prints_a_json_summary(store_dir, folder, tmp_path, cli_triage, capsys):
    out = tmp_path / "out"
    code = run_cli("triage", folder, "--out", out, "--store", store_dir, "--prompt", PROMPT, "--per-source", 1,
                   "--no-adaptive", "--json", "--quiet")
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 5 and summary["errors"] == 1 and Path(summary["files"]["report"]).is_file()
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    copy = next(x for x in lines if x["path"] == "a/b/same-bytes.png")  # in top.png's batch: counted once
    assert copy["duplicate_of"] == "top.png" and (copy["result"]["cached"], copy["result"]["generated"]) == (0, 0)
    page = (out / "report.html").read_text()
    assert "resynth triage " in page and "--per-source 1" in page and "--no-adaptive" in page


def test_the_case_states_the_test_that_decided_and_the_notes():
    """A verdict decided by the calibrated open-set score reads as that score against its own threshold (it read
    "score 0.9966 vs threshold -2329.3556": a similarity beside a Mahalanobis threshold), with the notes the CLI
    prints (a close call) and never "nan"."""
    result = {"query": "q.png", "verdict": "known", "predicted": "a", "margin": float("nan"), "calibrated": True,
              "description": "", "description_from": "none",
              "scores": [{"source": "a", "score": 0.99659, "probability": 0.542, "resyntheses": 22},
                         {"source": "b", "score": 0.99610, "probability": 0.41, "resyntheses": 1}],
              "evidence": {"score": 0.996589, "references": 22, "open_set_score": "mahalanobis",
                           "value": -1689.518313, "threshold": -2329.355601},
              "notes": ["close call: b is nearly as likely as a (p 0.410 against 0.542)"],
              "failed": {"c": "out of memory"}, "missing": ["c"]}
    page = casereport.to_string({"sources": []}, [{"label": "q.png", "result": result}])
    assert "mahalanobis -1689.52 ≥ threshold -2329.36 (best score 0.9966) · 22 references" in page
    assert "vs threshold -2329" not in page and "nan" not in page.lower() and "margin n/a" in page
    assert "note: close call: b is nearly as likely as a" in page and "note: c was not scored (it failed)" in page
    assert "0.9966 · p 0.542 · 22 refs<" in page and "0.9961 · p 0.410 · 1 ref<" in page
    assert "no description: nearest stored references only" in page and "calibrated probability" not in page
    rejected = {**result, "verdict": "unknown", "evidence": {**result["evidence"], "value": -3000.0}}
    assert "mahalanobis -3000.00 &lt; threshold" in casereport.to_string({}, [{"label": "q", "result": rejected}])
    fitted = {"fitted": True, "notes": {"mode": "combined", "aggregation": "knn", "open_set_score": "mahalanobis",
                                        "open_set_auroc": 0.990625, "fitted_on": "m.jsonl",
                                        "used": {"text": "used 60 originals of 5 sources; none skipped"}}}
    assert casereport.calibration_text(fitted).startswith(  # what the thresholds rest on, not "fitted" alone
        "fitted from m.jsonl: used 60 originals of 5 sources; none skipped (mode combined, aggregation knn, "
        "open-set score mahalanobis, unknown-source AUROC 0.991 as fitted)")
    assert casereport.calibration_text(None) == "none (verdicts are uncalibrated)"
    assert casereport.calibration_text(fitted, paths=False).startswith("fitted: used 60")  # the server's paths stay


def test_the_reported_command_reproduces_a_hostile_file_name():
    """A name with a bidi override, a quote and a byte that is not UTF-8: the report showed '...\\u202e...' in plain
    quotes, which names another file when pasted; bash's $'...' names this one, and shows no raw override."""
    import os

    name = os.fsdecode(b"caf\xe9 it's \\ \"q\" \xe2\x80\xaegnp.exe.png")
    import html

    shown = html.unescape(casereport.e(casereport.command_line(["printf", "%s", name])))  # as a reader copies it
    assert "\u202e" not in shown and "\\xe2\\x80\\xae" in shown
    for locale in ("C.UTF-8", "C"):  # bash reads \\u202e by the locale: under C it kept the six characters
        ran = subprocess.run(["bash", "-c", shown], capture_output=True, env={**os.environ, "LC_ALL": locale})
        assert ran.stdout == os.fsencode(name), locale
    tagged = "tag\U000e0041 new\nline\u200b.png"  # a tag character was dropped under C; a newline stays one
    ran = subprocess.run(["bash", "-c", casereport.command_line(["printf", "%s", tagged])], capture_output=True,
                         env={**os.environ, "LC_ALL": "C"})
    assert ran.stdout == tagged.encode()
    assert casereport.e(tagged).startswith("tag\\U000e0041 new\n")  # it showed \ue0041: U+E004 and a '1'
    assert casereport.command_line(["resynth", "a b.png"]) == "resynth 'a b.png'"  # plain names as before


def test_the_text_answer_names_a_long_path_whole():
    """`resynth attribute`'s text answer escapes a query's name (28422fb) but cut one past 160 characters in the
    middle, as an error message does: the answer then named no file."""
    from engine.attribute import Attribution, Report, SourceScore
    from engine.textanswer import text_answer

    long = "/data/" + "deep-folder/" * 20 + "x\u202e.png"
    answer = Attribution(query=long, description="d", description_from="prompt", predicted="sdxl", margin=0.1,
                         scores=[SourceScore("sdxl", 0.41, 3, 0.99)], missing=[], verdict="uncalibrated",
                         evidence={"score": 0.41, "references": 3})
    assert text_answer(Report([answer])).startswith(long.replace("\u202e", "\\u202e") + ": ")


def test_csv_cells_cannot_run_in_a_spreadsheet(tmp_path):
    rows = [{"path": "=cmd|' /C calc'!A0.png", "sha256": "0" * 64,
             "result": {"verdict": "known", "predicted": "@sum", "scores": [{"score": 0.5}], "margin": -0.1,
                        "description": "+1 trick", "description_from": "prompt"}}]
    triage.write_csv(tmp_path / "r.csv", rows)
    row = next(csv.DictReader((tmp_path / "r.csv").open()))
    assert row["path"].startswith("'=") and row["predicted"] == "'@sum" and row["description"] == "'+1 trick"
    assert row["margin"] == "-0.100000"  # a number stays a number
    rows[0]["path"] = "caf\udce9.png"  # a file name that is not UTF-8, as os.listdir gives it: a traceback before
    triage.write_csv(tmp_path / "r.csv", rows)
    assert next(csv.DictReader((tmp_path / "r.csv").open()))["path"] == "caf\\udce9.png"


def test_attribute_report_for_one_image(store_dir, originals, tmp_path):
    image = originals[3]["image"]
    with engine.open(store_dir) as ws:
        report = ws.attribute([image], PROMPT, FAST)
        path = casereport.write_attribution(tmp_path / "case.html", ws, report, [image], FAST,
                                            command="resynth attribute x.png")
    page = path.read_text()
    assert page.count("alt='query ") == 1 and page.count("resynthesis'>") >= 1
    assert "resynth attribute x.png" in page and json.dumps(FAST.to_dict(), sort_keys=True)[:20] in page.replace(
        "&quot;", '"')


def test_the_command_runs_as_a_user_types_it(store_dir, folder, tmp_path):
    """A real process, once engine.cli registers the command."""
    import engine.cli as cli

    if triage.register not in cli._extension_commands() and "triage" not in cli.build_parser().format_help():
        pytest.skip("engine.cli does not register `triage` yet")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "engine.cli", "triage", str(folder), "--out", str(out), "--store",
                           str(store_dir), "--prompt", PROMPT, "--per-source", "1", "--quiet"],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert "triaged 5 images" in done.stdout and (out / "report.html").is_file()


def test_attribute_report_flag(store_dir, originals, tmp_path, capsys, mounts):  # noqa: F811
    """`resynth attribute --report FILE`; on a full disk the answer is still shown, then the report's failure."""
    from engine.cli import build_parser

    if "--report" not in build_parser()._subparsers._group_actions[0].choices["attribute"].format_help():
        pytest.skip("engine.cli's attribute has no --report yet")
    image = originals[4]["image"]
    target = tmp_path / "case.html"
    assert run_cli("attribute", image, "--store", store_dir, "--prompt", PROMPT, "--per-source", 1,
                   "--report", target, "--quiet") == 0
    page = target.read_text()
    assert page.count("alt='query ") == 1 and "resynthesis'>" in page
    assert "resynth attribute " + str(Path(image).resolve()) in page and "--per-source 1" in page
    disk = mounts("tmpfs", tmp_path, "64k")
    (disk / "filler").write_bytes(b"\0" * 60_000)
    capsys.readouterr()
    assert run_cli("attribute", image, "--store", store_dir, "--prompt", PROMPT, "--per-source", 1,
                   "--report", disk / "case.html", "--quiet") == 5
    shown = capsys.readouterr()
    assert "resyntheses: " in shown.out and "case report" not in shown.out  # the answer, not lost
    assert f"No space left on device: {disk / 'case.html'}: the disk is full" in shown.err
    assert [p.name for p in disk.iterdir()] == ["filler"]


def test_a_full_disk_under_the_outputs_names_the_output(tmp_path, mounts):  # noqa: F811
    """A write() or fsync() that fails names no file: "the disk is full" left an analyst to guess whether
    the store's disk or the report's was. Each output now names itself, and nothing half-written stays."""
    from engine.errors import kind_of, message_of

    disk = mounts("tmpfs", tmp_path, "64k")
    (disk / "filler").write_bytes(b"\0" * 60_000)
    rows = [{"path": f"img{i}.png", "sha256": "0" * 64, "result": {"query": f"img{i}.png" * 50}} for i in range(99)]
    writes = [(disk / "case.html", lambda p: casereport.write(p, {"sources": []}, [{"label": "x" * 9000}])),
              (disk / "results.csv", lambda p: triage.write_csv(p, rows)),
              (disk / "results.jsonl", lambda p: triage.Results(p, "key").append(rows))]
    for path, write in writes:
        with pytest.raises(OSError) as caught:
            write(path)
        assert caught.value.filename == str(path) and kind_of(caught.value).exit_code == 5
        message = message_of(caught.value)
        assert message.startswith(f"No space left on device: {path}: the disk is full"), message
        left = {"filler"} | ({path.name} if path.suffix == ".jsonl" else set())  # appended to: torn lines skipped
        assert {p.name for p in disk.iterdir()} == left
