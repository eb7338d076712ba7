"""`resynth demo`: the whole method, offline, on a tiny zoo of genuinely different random generators."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import shutil
import time
from collections import Counter
from pathlib import Path

from engine import zoo
from engine.zoo import DESCRIPTIONS
from engine.aggregate import DEFAULT_PER_SOURCE
from engine.errors import UserError
from engine.paths import not_a_file, shown

KNOWN = 8  # descriptions whose resyntheses are in the dataset; the rest are generated on demand
PER_SOURCE = DEFAULT_PER_SOURCE
STEPS = 2
MARKER = ".resynth-demo"


def _open_elsewhere(shm: Path) -> bool:
    """Whether another process has this SQLite database open: every connection holds a shared lock on one
    byte of its -shm file (SQLite's "DMS" byte, offset 128) for as long as it is open."""
    try:
        fd = os.open(shm, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)
        return False
    except OSError as exc:  # EAGAIN/EACCES: held; a file system without locks cannot say: not held
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # also drops the probe's lock


def _prepare(workdir: Path) -> int:
    """The demo folder locked for this run (its own descriptor, held until the run ends), then emptied: a second
    `resynth demo` on it, started from another terminal, deleted the store and models the first was using,
    which then failed with a message about a source added twice."""
    what = not_a_file(workdir)
    if what not in ("a folder", "not found"):
        raise UserError(f"--workdir {shown(workdir)} is {what or 'a file'}: give a new or empty folder")
    workdir.mkdir(parents=True, exist_ok=True)
    held = os.open(workdir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `resynth demo` is running in {workdir}: let it finish, or give another "
                            "--workdir", code="demo_running") from None
        except OSError:  # a file system without locks: the demo runs unguarded, as it did before
            pass
        if any(workdir.iterdir()) and not (workdir / MARKER).exists():
            raise UserError(f"{workdir} exists and is not a demo folder; pass --workdir to an empty or new one")
        for shm in sorted(workdir.glob("*/metadata.sqlite-shm")):
            if _open_elsewhere(shm):
                raise UserError(f"{shm.parent} is open in another process (a `resynth serve` of the demo's store?), "
                                f"and the demo deletes and rebuilds {workdir}: stop that process first, or give "
                                "another --workdir", code="demo_store_in_use")
        for entry in workdir.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        (workdir / MARKER).write_text("made by resynth demo; deleted and rebuilt on each run\n")
    except BaseException:
        os.close(held)
        raise
    return held


def _make_dataset(models: dict, root: Path) -> tuple[Path, list[dict]]:
    """Originals (the "unknown" images) and resyntheses of the known descriptions, as a manifest."""
    from engine.evaluation.synthetic import write_dataset

    full = write_dataset(models["pipelines"], root, DESCRIPTIONS, seeds=tuple(range(PER_SOURCE)), steps=STEPS,
                         resynthesized=KNOWN)
    rows = [json.loads(line) for line in full.read_text().splitlines()]
    queries = [{"image": str(root / r["image"]), "prompt": r["description"], "source": r["source"],
                "known": DESCRIPTIONS.index(r["description"]) < KNOWN} for r in rows if r["role"] == "original"]
    path = root / "resyntheses.jsonl"  # the originals stay out of the store: they are the queries
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["role"] == "resynthesis"))
    return path, queries


def _accuracy_table(rows: list[tuple[str, str | None]]) -> tuple[str, dict]:
    totals, hits = Counter(t for t, _ in rows), Counter(t for t, p in rows if t == p)
    per_source = {s: hits[s] / totals[s] for s in sorted(totals)}
    lines = [f"{'source':20} {'correct':>8} {'accuracy':>9}"]
    lines += [f"{s:20} {hits[s]:>4}/{totals[s]:<3} {per_source[s]:>9.0%}" for s in per_source]
    overall = sum(hits.values()) / len(rows)
    lines.append(f"{'all':20} {sum(hits.values()):>4}/{len(rows):<3} {overall:>9.0%}   (chance {1 / len(totals):.0%})")
    return "\n".join(lines), {"overall": overall, "per_source": per_source, "chance": 1 / len(totals)}


def _share(rows: list[tuple[str, str | None]]) -> str:
    right = sum(truth == predicted for truth, predicted in rows)
    return f"{right}/{len(rows)} ({right / len(rows):.0%})"


def reuse_lines(models: dict, sources: list[dict], store_dir: Path, queries: list[dict],
                manifest: Path | None = None) -> list[str]:
    """Where the demo left its models, the recipe of each source, the commands that reuse them with the
    same recipe, and what to run next. A pipeline added with another recipe (the default 30 steps,
    say) makes other images than these queries were made with, and its answers are wrong."""
    from engine.recipes import add_command, recipe

    q = shlex.quote
    clip = f"--clip-config {q(str(models['clip_config']))} --clip-checkpoint {q(str(models['clip_checkpoint']))}"
    example = next((x for x in queries if not x["known"]), queries[0])
    lines = [f"models (kept in {q(str(Path(models['captioner']).parent))}):",
             f"  CLIP image encoder: {clip}",
             f"  captioner:          {models['captioner']}"]
    width = max(len(s["name"]) for s in sources)
    lines += [f"  {s['name']:{width}}  {s['path']}; recipe: {recipe(s['kind'], s['params'], s['path'])}"
              for s in sources]
    lines += ["", "reuse them with the same recipes (the recipe is part of a source: the demo's images were made "
                  "with these settings):",
              f"  resynth init --store my-store {clip} --captioner {q(str(models['captioner']))}"]
    lines += [f"  {add_command(s['name'], s['path'], s['params'], 'my-store')}" for s in sources if s["path"]]
    lines += ["", "next:",
              f"  resynth source list --store {q(str(store_dir))}            # the sources and their recipes",
              f"  resynth attribute {q(example['image'])} --prompt {q(example['prompt'])} --store {q(str(store_dir))}",
              f"  resynth calibrate {q(str(manifest)) + ' ' if manifest else ''}--store {q(str(store_dir))}"
              "   # then attribute says known / unknown source",
              f"  resynth serve --store {q(str(store_dir))}                  # web page and HTTP API"]
    return lines


def run_demo(workdir: Path, progress: bool = True) -> dict:
    """Every step through the library API a user has (engine.init / Workspace), with its defaults.

    PyTorch runs on one thread meanwhile: the zoo's models are too small to gain from more, and on a
    machine busy with other work its threads spin waiting for each other (measured on 2 cores at load
    7-8: 9 min with PyTorch's default 2 threads, 42 s with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(workdir, progress)
    finally:
        torch.set_num_threads(threads)


def _run_demo(workdir: Path, progress: bool) -> dict:
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    held = _prepare(workdir)
    try:
        return _run_in(workdir, progress, timings, clock)
    finally:
        os.close(held)


def _run_in(workdir: Path, progress: bool, timings: dict[str, float], clock: float) -> dict:
    import engine

    models = zoo.write_zoo(workdir / "models")
    timings["build tiny models"] = time.perf_counter() - clock
    store_dir = workdir / "store"

    clock = time.perf_counter()
    with engine.init(store_dir, clip_config=models["clip_config"], clip_checkpoint=models["clip_checkpoint"],
                     captioner=models["captioner"], progress=progress) as ws:
        for name, folder in models["pipelines"].items():
            ws.add_source(name, folder, steps=STEPS)
        timings["register"] = time.perf_counter() - clock

        clock = time.perf_counter()
        manifest, queries = _make_dataset(models, workdir / "dataset")
        timings["make dataset"] = time.perf_counter() - clock
        clock = time.perf_counter()
        ws.ingest(manifest)
        timings["ingest"] = time.perf_counter() - clock

        report: dict = {"workdir": str(workdir)}
        clock = time.perf_counter()
        first_report = ws.attribute([q["image"] for q in queries], [q["prompt"] for q in queries])  # defaults
        results = first_report.results
        timings["attribute (first pass)"] = time.perf_counter() - clock
        first = {"cached": first_report.cached, "generated": first_report.generated,
                 "stage_seconds": first_report.seconds}
        # Same queries again: every resynthesis is now cached, so nothing is generated.
        clock = time.perf_counter()
        again = ws.attribute([q["image"] for q in queries], [q["prompt"] for q in queries])
        repeat = again.results
        timings["attribute (repeat)"] = time.perf_counter() - clock
        second = {"cached": again.cached, "generated": again.generated}
        # Queries with no prompt: described by the captioner, then resynthesized from its caption.
        uncaptioned = [q for q in queries if not q["known"]][:: len(DESCRIPTIONS) - KNOWN]
        captioned = ws.attribute([q["image"] for q in uncaptioned]).results
        stats = ws.stats()
        sources = ws.list_sources()  # the recipes as stored, not as this file meant them
    labels = [(q["source"], r.predicted) for q, r in zip(queries, results)]
    assert [r.predicted for r in repeat] == [r.predicted for r in results], "cached answers must not change"
    table, accuracy = _accuracy_table(labels)
    known = [lab for q, lab in zip(queries, labels) if q["known"]]
    new = [lab for q, lab in zip(queries, labels) if not q["known"]]
    by_caption = [(q["source"], r.predicted) for q, r in zip(uncaptioned, captioned)]
    known_acc, new_acc, caption_acc = (_accuracy_table(part)[1]["overall"] for part in (known, new, by_caption))
    lines = [table, "",  # counts beside each share: the captioned share is of a handful of queries, not of 60
             f"queries with resyntheses already in the store: {_share(known)} correct; "
             f"with new descriptions (generated on demand): {_share(new)}; "
             f"without prompt (captioned): {_share(by_caption)}",
             f"first pass: {first['cached']} resyntheses cached, {first['generated']} generated; "
             f"repeat: {second['cached']} cached, {second['generated']} generated",
             "stage seconds (first pass): " + ", ".join(f"{k} {v:.2f}" for k, v in first["stage_seconds"].items()),
             "timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
             + f" (total {sum(timings.values()):.0f}s)",
             f"store: {stats['vectors']} vectors in {store_dir}", "",
             *reuse_lines(models, sources, store_dir, queries, manifest.parent / "manifest.jsonl")]
    report.update({"models": {"clip_config": str(models["clip_config"]),
                              "clip_checkpoint": str(models["clip_checkpoint"]),
                              "captioner": str(models["captioner"]),
                              "pipelines": {k: str(v) for k, v in models["pipelines"].items()}},
                   "sources": sources, "table": "\n".join(lines), "accuracy": accuracy, "accuracy_known": known_acc,
                   "accuracy_new": new_acc, "accuracy_captioned": caption_acc, "first_pass": first,
                   "repeat": second, "timings": timings, "store": stats,
                   "results": [r.to_dict() for r in results]})
    return report
