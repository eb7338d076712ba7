"""Soak test: writer and reader processes and one server against one store, then a verify.

Builds the tiny model zoo, a store with its five pipelines (steps=2) and a few query images, starts
`resynth serve` on a free loopback port, and for --seconds runs:

* --writers N writer loops, each launching real `resynth` processes one after another:
  `attribute IMG --prompt P --per-source 1 --json` with a new unique prompt (generation + commits),
  with a prompt every writer also uses at about the same time (cross-process single flight), or with
  the description of a shared manifest (a key that an ingest may commit at the same moment);
  `ingest` of small manifests, some shared by every writer (idempotent), some private; and now and
  then `rebuild`;
* --readers M reader loops: cached lookups over HTTP (POST /v1/attribute with prompts already
  stored), new and shared prompts over HTTP (the server generates), and `attribute` (cached),
  `stats` and `source list` through the CLI; a few deliberate input errors (a missing image, an
  empty prompt) check that they stay input errors.

Every command's exit status and stderr and every HTTP status is recorded and classified: exit 2 /
HTTP 4xx input, exit 3 / 502 source, exit 4 / 503 store damage, any other status, a traceback or a
hang is a bug. Every successful answer acknowledges what it stored or used (the resyntheses each
attribution scored, the rows of each ingested manifest, the vector count of each rebuild); at the
end the store's database (opened read-only) must still hold every acknowledged vector ("vectors
lost" must be 0) and `resynth verify --json` must report ok.

Exit status 0 only when nothing was lost, verify is ok and no unexpected error was seen.

    python scripts/soak.py [--writers 2] [--readers 2] [--seconds 60] [--workdir DIR] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Several torch processes share few cores here: one thread each avoids OpenMP spin-waiting against each
# other (set OMP_NUM_THREADS to override). Read by this process, the server and every command.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from index.keys import normalise_description  # noqa: E402

STEPS = 2  # generation steps of every tiny source
QUERY_SEED = 1000  # query images use seeds no resynthesis uses
SHARED_MANIFESTS = 4
QUERY_IMAGES_PER_SOURCE = 2  # from each of two sources
COMMAND_TIMEOUT = 300.0  # a command running longer than this is a hang (a bug)
# Every writer starts with the same shared manifest, then the same shared prompt (races from the first
# second); odd writers rebuild early, while the others ingest and generate. Cheap commands come first, so
# that a short run on a busy machine still runs every kind.
WRITER_CYCLES = (("ingest_shared", "attr_shared", "ingest_private", "attr_new", "rebuild", "attr_ingested",
                  "ingest_shared", "attr_shared", "attr_new"),
                 ("ingest_shared", "attr_shared", "rebuild", "attr_ingested", "ingest_private", "attr_new",
                  "attr_shared", "ingest_shared", "attr_new"))
READER_MIX = {"http_cached": 50, "http_new": 7, "http_shared": 7, "cli_stats": 10, "cli_sources": 8,
              "cli_attr_cached": 6, "cli_missing_image": 4, "http_empty_prompt": 6}
EXIT_KINDS = {0: "ok", 2: "input", 3: "source", 4: "store damage"}


# ----- setup ------------------------------------------------------------------------------------------------
def setup(workdir: Path) -> dict:
    """Tiny zoo, a store with every zoo pipeline, query images, shared manifests, two warm descriptions."""
    import engine
    from engine import zoo
    from engine.generate import DiffusersGenerator, GenerationParams
    from engine.images import save_png_atomic
    from engine.options import Options

    models = zoo.write_zoo(workdir / "models")
    pipelines = {name: str(folder) for name, folder in models["pipelines"].items()}
    store = workdir / "store"
    data = workdir / "data"
    (data / "images").mkdir(parents=True)
    queries = []
    for name in sorted(pipelines)[:2]:  # query images: "unknown" originals of two sources
        generator = DiffusersGenerator(name, Path(pipelines[name]), GenerationParams(steps=STEPS))
        for image in generator.generate(zoo.DESCRIPTIONS[0], [QUERY_SEED + k for k in range(QUERY_IMAGES_PER_SOURCE)]):
            path = data / "images" / f"q{len(queries)}.png"
            save_png_atomic(image, path)
            queries.append(path)
        generator.unload()
    shared_texts = [f"soak shared manifest {k}: {zoo.DESCRIPTIONS[4 + k]}" for k in range(SHARED_MANIFESTS)]
    names = sorted(pipelines)
    manifests = []
    for k, text in enumerate(shared_texts):
        rows = [{"image": f"images/q{k % len(queries)}.png", "source": names[k % 2], "description": text,
                 "role": "original"},
                {"image": f"images/q{(k + 1) % len(queries)}.png", "source": f"replay-{k % 2}", "description": text,
                 "role": "resynthesis"},
                # seed 0 of a pipeline source: the same key an attribution of this description wants
                {"image": f"images/q{(k + 2) % len(queries)}.png", "source": names[0], "description": text,
                 "role": "resynthesis", "seed": 0}]
        path = data / f"shared-{k}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        manifests.append(path)
    warm = list(zoo.DESCRIPTIONS[:1])
    with engine.init(store, clip_config=models["clip_config"], clip_checkpoint=models["clip_checkpoint"]) as ws:
        for name, folder in pipelines.items():
            ws.add_source(name, folder, steps=STEPS)
        report = ws.attribute(queries[0], warm[0], Options(per_source=1))  # readers have a cached prompt at once
    return {"store": store, "data": data, "pipelines": pipelines, "queries": queries, "shared": manifests,
            "shared_texts": shared_texts, "warm": report.to_dict()}


# ----- what the soak saw --------------------------------------------------------------------------------------
class Ledger:
    """Every command and request, and every vector a successful answer acknowledged."""

    def __init__(self, pipelines: set[str], log_path: Path):
        self.pipelines = pipelines
        self.lock = threading.Lock()
        self.records: list[dict] = []
        self.acked_keys: set[tuple[str, str, int]] = set()  # (pipeline source, description, seed)
        self.acked_replay: dict[tuple[str, str], int] = {}  # (replay source, description) -> references seen
        self.acked_rows: set[tuple] = set()  # ingested manifest rows
        self.rebuild_max = 0
        self.shared_current = 0  # the shared prompt a writer is generating now (readers post it too)
        self.cached_prompts: list[str] = []
        self.generated = 0
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.log = log_path.open("w")

    def record(self, entry: dict) -> None:
        with self.lock:
            self.records.append(entry)
            self.log.write(json.dumps(entry) + "\n")
            self.log.flush()

    def ack_attribution(self, answer: dict) -> None:
        with self.lock:
            self.generated += answer["cache"]["generated"]
            for result in answer["results"]:
                text = normalise_description(result["description"])
                for score in result["scores"]:
                    if score["source"] in self.pipelines:
                        self.acked_keys.add((score["source"], text, 0))
                    else:
                        key = (score["source"], text)
                        self.acked_replay[key] = max(self.acked_replay.get(key, 0), score["resyntheses"])
                if result["description_from"] == "prompt" and result["description"] not in self.cached_prompts:
                    self.cached_prompts.append(result["description"])

    def ack_manifest(self, manifest: Path) -> None:
        import hashlib

        rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        with self.lock:
            for r in rows:
                file_hash = hashlib.sha256((manifest.parent / r["image"]).read_bytes()).hexdigest()
                seeded = r["source"] in self.pipelines and r["role"] == "resynthesis" and r.get("seed") is not None
                # a seeded pipeline resynthesis is a recipe: a generated image may hold that key instead
                self.acked_rows.add((r["source"], normalise_description(r["description"]), r["role"],
                                     r.get("seed"), None if seeded else file_hash))

    def prompt(self, rng: random.Random) -> str | None:
        with self.lock:
            return rng.choice(self.cached_prompts) if self.cached_prompts else None


def classify_exit(rc: int | None, stderr: str, expected: int | None) -> str:
    if rc is None:
        return "bug: hang (timeout)"
    if "Traceback" in stderr:
        return "bug: traceback"
    if expected is not None:
        return "deliberate" if rc == expected else f"bug: exit {rc} where {expected} was expected"
    return EXIT_KINDS.get(rc, f"bug: exit {rc}")


def run_cli(ledger: Ledger, worker: str, op: str, argv: list[str], store: Path,
            expected: int | None = None) -> tuple[str, dict | None]:
    """One `resynth` process; returns (classification, parsed JSON answer or None)."""
    cmd = [sys.executable, "-m", "engine.cli", *argv, "--store", str(store), "--json", "--quiet"]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = None, exc.stdout or "", str(exc.stderr or "")
    seconds = time.perf_counter() - started
    kind = classify_exit(rc, err, expected)
    answer = None
    if kind == "ok":
        try:
            answer = json.loads(out)
        except ValueError:
            kind = "bug: exit 0 without JSON"
    entry = {"worker": worker, "op": op, "via": "cli", "argv": argv, "rc": rc, "kind": kind,
             "seconds": round(seconds, 3), "stderr": err[-4000:], "at": round(time.time(), 3)}
    if isinstance(answer, dict) and "cache" in answer:  # an attribution: what it reused, made, and where time went
        entry.update(cache=answer["cache"], stages=answer.get("seconds"))
    ledger.record(entry)
    return kind, answer


def post_attribute(ledger: Ledger, http: httpx.Client, worker: str, op: str, image: Path, prompt: str,
                   expected: int | None = None) -> tuple[str, dict | None]:
    started = time.perf_counter()
    status, body, answer = None, "", None
    try:
        reply = http.post("/v1/attribute", files={"image": (image.name, image.read_bytes(), "image/png")},
                          data={"prompt": prompt, "per_source": "1"})
        status, body = reply.status_code, reply.text
    except httpx.HTTPError as exc:
        body = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - started
    if status is None:
        kind = "bug: http connection error"
    elif expected is not None:
        kind = "deliberate" if status == expected else f"http {status} where {expected} was expected"
    elif status == 200:
        kind = "ok"
        try:
            answer = json.loads(body)
        except ValueError:
            kind = "bug: http 200 without JSON"
    else:
        try:
            code = json.loads(body).get("error", {}).get("code", "")
        except (ValueError, AttributeError):
            code = ""
        label = {400: "input", 404: "input", 413: "input", 415: "input", 502: "source", 503: "store damage/busy"}
        kind = f"http {status} {code} ({label.get(status, 'bug')})".replace("  ", " ")
    if kind == "ok":
        with ledger.lock:
            ledger.latencies[op].append(seconds)
    ledger.record({"worker": worker, "op": op, "via": "http", "prompt": prompt, "status": status, "kind": kind,
                   "seconds": round(seconds, 3), "body": "" if kind == "ok" else body[-2000:],
                   "cache": answer.get("cache") if isinstance(answer, dict) else None, "at": round(time.time(), 3)})
    return kind, answer


# ----- the loops -------------------------------------------------------------------------------------------------
def writer(w: int, env: dict, ledger: Ledger, deadline: float) -> None:
    rng = random.Random(1000 + w)
    store, queries, data = env["store"], env["queries"], env["data"]
    names = sorted(env["pipelines"])
    counts: Counter = Counter()
    cycle = WRITER_CYCLES[w % len(WRITER_CYCLES)]
    i = 0
    while time.monotonic() < deadline:
        op = cycle[i % len(cycle)]
        i += 1
        n = counts[op]
        counts[op] += 1
        me = f"writer-{w}"
        image = rng.choice(queries)
        if op == "attr_new":
            prompt = f"soak writer {w} prompt {n}: {rng.choice(env['texts'])}"
        elif op == "attr_shared":  # the n-th shared prompt is the same for every writer (and some readers)
            prompt = shared_prompt(env, n)
            with ledger.lock:
                ledger.shared_current = max(ledger.shared_current, n)
        elif op == "attr_ingested":  # a key a shared manifest also commits (ingest and generation race)
            k = n % SHARED_MANIFESTS
            prompt = env["shared_texts"][k]
            image = queries[(k + 3) % len(queries)]  # not one of that manifest's images (never its own evidence)
        if op.startswith("attr"):
            kind, answer = run_cli(ledger, me, op, ["attribute", str(image), "--prompt", prompt, "--per-source", "1"],
                                   store)
            if answer is not None:
                ledger.ack_attribution(answer)
                check_answer(ledger, me, op, answer)
        elif op == "ingest_shared":
            manifest = env["shared"][n % len(env["shared"])]
            kind, answer = run_cli(ledger, me, op, ["ingest", str(manifest)], store)
            if answer is not None:
                ledger.ack_manifest(manifest)
                check_ingest(ledger, me, op, manifest, answer)
        elif op == "ingest_private":
            text = f"soak private ingest writer {w} number {n}"
            rows = [{"image": f"images/q{rng.randrange(len(queries))}.png", "source": names[(w + n) % len(names)],
                     "description": text, "role": "original"},
                    {"image": f"images/q{rng.randrange(len(queries))}.png", "source": f"replay-w{w}",
                     "description": text, "role": "resynthesis"}]
            manifest = data / f"private-w{w}-{n}.jsonl"
            manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
            kind, answer = run_cli(ledger, me, op, ["ingest", str(manifest)], store)
            if answer is not None:
                ledger.ack_manifest(manifest)
                check_ingest(ledger, me, op, manifest, answer)
        elif op == "rebuild":
            kind, answer = run_cli(ledger, me, op, ["rebuild"], store)
            if answer is not None:
                with ledger.lock:
                    ledger.rebuild_max = max(ledger.rebuild_max, int(answer["vectors"]))


def reader(r: int, env: dict, ledger: Ledger, deadline: float, url: str) -> None:
    rng = random.Random(2000 + r)
    store, queries = env["store"], env["queries"]
    ops, weights = zip(*READER_MIX.items())
    counts: Counter = Counter()
    me = f"reader-{r}"
    with httpx.Client(base_url=url, timeout=COMMAND_TIMEOUT) as http:
        while time.monotonic() < deadline:
            op = rng.choices(ops, weights)[0]
            n = counts[op]
            counts[op] += 1
            image = rng.choice(queries)
            prompt = ledger.prompt(rng)
            if op == "http_cached" and prompt:
                kind, answer = post_attribute(ledger, http, me, op, image, prompt)
            elif op == "http_new" or (op == "http_cached" and not prompt):
                op = "http_new"
                kind, answer = post_attribute(ledger, http, me, op, image,
                                              f"soak reader {r} server prompt {n}: {rng.choice(env['texts'])}")
            elif op == "http_shared":  # what the writers are generating now, or will next
                with ledger.lock:
                    k = ledger.shared_current + rng.randrange(2)
                kind, answer = post_attribute(ledger, http, me, op, image, shared_prompt(env, k))
            elif op == "http_empty_prompt":
                kind, answer = post_attribute(ledger, http, me, op, image, "   ", expected=400)
            elif op == "cli_stats":
                kind, answer = run_cli(ledger, me, op, ["stats"], store)
            elif op == "cli_sources":
                kind, answer = run_cli(ledger, me, op, ["source", "list"], store)
            elif op == "cli_missing_image":
                kind, answer = run_cli(ledger, me, op, ["attribute", str(env["data"] / "no-such.png"), "--prompt",
                                                        "anything at all", "--per-source", "1"], store, expected=2)
            else:  # cli_attr_cached (or the first ones before anything is cached: generates)
                kind, answer = run_cli(ledger, me, op, ["attribute", str(image), "--prompt",
                                                        prompt or "soak reader fallback prompt", "--per-source", "1"],
                                       store)
            if answer is not None and op.startswith(("http", "cli_attr")) and op != "http_empty_prompt":
                ledger.ack_attribution(answer)
                check_answer(ledger, me, op, answer)
            if op == "http_cached" and answer is not None and answer["cache"]["generated"]:
                # a prompt acknowledged as stored was generated again: the cache lost it
                ledger.record({"worker": me, "op": op, "via": "check", "kind": "bug: cached prompt regenerated",
                               "prompt": prompt, "answer": answer["cache"]})
            time.sleep(0.1)


def shared_prompt(env: dict, n: int) -> str:
    return f"soak shared prompt {n}: {env['texts'][n % len(env['texts'])]}"


def check_answer(ledger: Ledger, worker: str, op: str, answer: dict) -> None:
    """Every pipeline source must be scored in a successful attribution (none can fail in the zoo)."""
    for result in answer["results"]:
        unscored = sorted(set(result["missing"]) & ledger.pipelines)
        if unscored or result["failed"]:
            ledger.record({"worker": worker, "op": op, "via": "check", "kind": "bug: pipeline source not scored",
                           "description": result["description"], "missing": unscored, "failed": result["failed"]})


def check_ingest(ledger: Ledger, worker: str, op: str, manifest: Path, answer: dict) -> None:
    lines = [line for line in manifest.read_text().splitlines() if line.strip()]
    if answer["rows"] != len(lines) or answer["added"] + answer["skipped"] != len(lines):
        ledger.record({"worker": worker, "op": op, "via": "check", "kind": "bug: ingest counts",
                       "manifest": manifest.name, "answer": answer})


# ----- the end: what the store still holds ----------------------------------------------------------------------
def stored_rows(store: Path) -> list[tuple]:
    """(source, description, role, seed, file_hash) of every image that has a vector, read-only."""
    db = sqlite3.connect(f"file:{store / 'metadata.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT s.name, d.text, i.role, i.seed, i.file_hash FROM images i "
                          "JOIN sources s ON s.id = i.source_id JOIN descriptions d ON d.id = i.description_id "
                          "JOIN vectors v ON v.image_id = i.id").fetchall()
    finally:
        db.close()


def count_lost(ledger: Ledger, store: Path) -> dict:
    rows = stored_rows(store)
    have_keys = {(s, d, seed) for s, d, role, seed, _ in rows if role == "resynthesis"}
    have_rows = {(s, d, role, seed, h) for s, d, role, seed, h in rows}
    have_rows |= {(s, d, role, seed, None) for s, d, role, seed, h in rows}
    replay = Counter((s, d) for s, d, role, _, _ in rows if role == "resynthesis" and s not in ledger.pipelines)
    lost_keys = sorted(k for k in ledger.acked_keys if k not in have_keys)
    lost_rows = sorted(map(str, (r for r in ledger.acked_rows if r not in have_rows)))
    lost_replay = {f"{s} / {d}": (n, replay[(s, d)]) for (s, d), n in ledger.acked_replay.items() if replay[(s, d)] < n}
    rebuild_short = max(0, ledger.rebuild_max - len(rows))
    committed = len(ledger.acked_keys) + len(ledger.acked_rows - {r for r in ledger.acked_rows if r[3] is not None
                                                                  and (r[0], r[1], r[3]) in ledger.acked_keys})
    return {"stored_vectors": len(rows), "acknowledged": committed,
            "lost": len(lost_keys) + len(lost_rows) + len(lost_replay) + rebuild_short,
            "lost_keys": [list(k) for k in lost_keys[:20]], "lost_rows": lost_rows[:20], "lost_replay": lost_replay,
            "rebuild_max_vectors": ledger.rebuild_max}


def verify(store: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "verify", "--store", str(store), "--json", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = {}
    ok = proc.returncode == 0 and not report.get("problems")
    return {"ok": ok, "rc": proc.returncode, "problems": report.get("problems", []), "stderr": proc.stderr[-2000:],
            "report": report}


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000, q)), 1) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=2, help="writer loops (default 2)")
    parser.add_argument("--readers", type=int, default=2, help="reader loops (default 2)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long new commands start (default 60)")
    parser.add_argument("--workdir", help="where models, data, store and log go (default: a new temporary folder, "
                                          "deleted after a clean run)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    from engine.service.process import ServerProcess
    from engine.zoo import DESCRIPTIONS

    temporary = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="resynth-soak-"))
    if not temporary:
        if workdir.exists() and any(workdir.iterdir()):
            if not (workdir / ".resynth-soak").exists():
                print(f"soak: {workdir} is not empty and not a soak folder", file=sys.stderr)
                return 2
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    (workdir / ".resynth-soak").write_text("made by scripts/soak.py; deleted and rebuilt on each run\n")

    clock = time.perf_counter()
    env = setup(workdir)
    env["texts"] = list(DESCRIPTIONS)
    setup_seconds = time.perf_counter() - clock
    ledger = Ledger(set(env["pipelines"]), workdir / "soak-log.jsonl")
    ledger.ack_attribution(env["warm"])

    clock = time.perf_counter()
    server = ServerProcess(env["store"], "--refresh-seconds", "1")
    server_start = time.perf_counter() - clock
    started = time.perf_counter()
    deadline = time.monotonic() + args.seconds
    try:
        threads = [threading.Thread(target=writer, args=(w, env, ledger, deadline), name=f"writer-{w}")
                   for w in range(args.writers)]
        threads += [threading.Thread(target=reader, args=(r, env, ledger, deadline, server.url), name=f"reader-{r}")
                    for r in range(args.readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        try:
            service = httpx.get(server.url + "/v1/stats", timeout=30).json().get("service", {})
        except (httpx.HTTPError, ValueError) as exc:
            service = {"error": str(exc)}
    finally:
        server.stop()
    server_log = server.log
    server_rc = server.proc.returncode
    ledger.log.close()

    lost = count_lost(ledger, env["store"])
    checked = verify(env["store"])

    records = ledger.records
    commands = Counter(r["op"] for r in records if r["via"] in ("cli", "http"))
    kinds = Counter(r["kind"] for r in records)
    errors = {k: v for k, v in kinds.items() if k != "ok"}
    unexpected = {k: v for k, v in errors.items() if k != "deliberate"}
    if "Traceback" in server_log:
        unexpected["bug: server traceback"] = server_log.count("Traceback")
    if server_rc not in (0, -15):
        unexpected[f"bug: server exit {server_rc}"] = 1
    http_ok = [x for op, xs in ledger.latencies.items() for x in xs]
    http_all = sum(1 for r in records if r["via"] == "http")
    samples = {}
    for r in records:
        if r["kind"] in unexpected and r["kind"] not in samples:
            samples[r["kind"]] = {k: v for k, v in r.items() if k not in ("at",)}
    summary = {
        "workdir": str(workdir), "writers": args.writers, "readers": args.readers,
        "seconds": args.seconds, "elapsed_seconds": round(elapsed, 1), "setup_seconds": round(setup_seconds, 1),
        "server_start_seconds": round(server_start, 1),
        "commands": dict(sorted(commands.items())), "commands_total": sum(commands.values()),
        "vectors_committed": lost["acknowledged"], "vectors_generated": ledger.generated,
        "stored_vectors": lost["stored_vectors"], "vectors_lost": lost["lost"], "lost_detail": lost,
        "errors": dict(sorted(errors.items())), "unexpected_errors": dict(sorted(unexpected.items())),
        "error_samples": samples,
        "verify": {"ok": checked["ok"], "rc": checked["rc"], "problems": checked["problems"]},
        "server": {"requests": http_all, "answered_200": len(http_ok),
                   "p50_ms": percentile_ms(http_ok, 50), "p99_ms": percentile_ms(http_ok, 99),
                   "p50_cached_ms": percentile_ms(ledger.latencies.get("http_cached", []), 50),
                   "counters": service, "log_tail": server_log[-1500:] if unexpected else ""},
    }
    passed = lost["lost"] == 0 and checked["ok"] and not unexpected
    summary["passed"] = passed
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(report_text(summary))
    if temporary and passed:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not passed:
        print(f"soak: kept {workdir} (log: soak-log.jsonl)", file=sys.stderr)
    return 0 if passed else 1


def report_text(s: dict) -> str:
    srv = s["server"]
    lines = [f"soak: {s['writers']} writers, {s['readers']} readers, {s['seconds']:g} s of new commands, "
             f"{s['elapsed_seconds']} s until the last one ended "
             f"(setup {s['setup_seconds']} s, server start {s['server_start_seconds']} s)",
             f"commands run: {s['commands_total']} - " + ", ".join(f"{k} {v}" for k, v in s["commands"].items()),
             f"vectors committed (acknowledged by successful answers): {s['vectors_committed']}; stored at the end: "
             f"{s['stored_vectors']}; generation reported by answers: {s['vectors_generated']} images (a request "
             f"that joined the server's in-flight generation reports it too)",
             f"vectors lost: {s['vectors_lost']}",
             "errors by kind: " + (", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "none"),
             "unexpected errors: " + (", ".join(f"{k} {v}" for k, v in s["unexpected_errors"].items()) or "none"),
             "verify: " + ("ok" if s["verify"]["ok"] else f"FAILED (exit {s['verify']['rc']}): "
                                                            + "; ".join(map(str, s["verify"]["problems"]))),
             f"server: {srv['requests']} requests, {srv['answered_200']} answered 200, p50 {srv['p50_ms']} ms "
             f"(cached lookups p50 {srv['p50_cached_ms']} ms), p99 {srv['p99_ms']} ms",
             "result: " + ("PASS" if s["passed"] else "FAIL")]
    for kind, sample in s["error_samples"].items():
        lines.append(f"  first {kind}: {json.dumps(sample)[:1500]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
