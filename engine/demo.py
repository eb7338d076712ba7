"""`resynth demo`: the whole method, offline, on a tiny zoo of genuinely different random generators."""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from engine import zoo
from engine.aggregate import DEFAULT_PER_SOURCE
from engine.errors import UserError

DESCRIPTIONS = [
    "head and shoulders portrait of an old man with a grey beard",
    "portrait photo of a young woman with red hair, studio light",
    "a smiling child wearing a blue hat, outdoors",
    "close-up portrait of a man with glasses in a dark room",
    "portrait of a woman with short black hair, soft light",
    "an elderly woman smiling, looking at the camera",
    "a young man with long hair in a park",
    "painting of a woman wearing a green scarf",
    "a bald man with a moustache, black and white photo",
    "portrait of a teenager with freckles and curly hair",
    "a woman in a red dress against a white wall",
    "an old fisherman with a weathered face",
]
KNOWN = 8  # descriptions whose resyntheses are in the dataset; the rest are generated on demand
PER_SOURCE = DEFAULT_PER_SOURCE
STEPS = 2
MARKER = ".resynth-demo"


def _resynth(*argv: str) -> None:
    """Run a resynth command exactly as a user would type it; its output goes to stderr."""
    from engine.cli import main

    print("$ resynth " + " ".join(argv), file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):
        if main(list(argv)) != 0:
            raise UserError(f"demo step failed: resynth {' '.join(argv)}")


def _prepare(workdir: Path) -> None:
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise UserError(f"{workdir} exists and is not a demo folder; pass --workdir to an empty or new one")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by resynth demo; deleted and rebuilt on each run\n")


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


def run_demo(workdir: Path, progress: bool = True) -> dict:
    from engine.attribute import Attributor, Query
    from engine.workspace import load_captioner, load_embedder, load_generators
    from index.store import Store

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    _prepare(workdir)
    models = zoo.write_zoo(workdir / "models")
    timings["build tiny models"] = time.perf_counter() - clock
    store_dir = str(workdir / "store")

    clock = time.perf_counter()
    _resynth("init", "--store", store_dir, "--clip-config", str(models["clip_config"]),
             "--clip-checkpoint", str(models["clip_checkpoint"]), "--captioner", str(models["captioner"]))
    for name, folder in models["pipelines"].items():
        _resynth("source", "add", name, str(folder), "--store", store_dir, "--steps", str(STEPS))
    timings["register"] = time.perf_counter() - clock

    clock = time.perf_counter()
    manifest, queries = _make_dataset(models, workdir / "dataset")
    timings["make dataset"] = time.perf_counter() - clock
    clock = time.perf_counter()
    _resynth("ingest", str(manifest), "--store", store_dir, *([] if progress else ["--quiet"]))
    timings["ingest"] = time.perf_counter() - clock

    report: dict = {"workdir": str(workdir)}
    with Store.open(Path(store_dir)) as store:
        attributor = Attributor(store, load_embedder(store), load_generators(store), load_captioner(store),
                                progress=progress)  # the defaults a user gets
        clock = time.perf_counter()
        results = attributor.attribute([Query.from_path(Path(q["image"]), q["prompt"]) for q in queries])
        timings["attribute (first pass)"] = time.perf_counter() - clock
        first = {"cached": attributor.stats.cached, "generated": attributor.stats.generated,
                 "stage_seconds": dict(attributor.stats.seconds)}
        # Same queries again: every resynthesis is now cached, so nothing is generated.
        attributor.stats = type(attributor.stats)()
        clock = time.perf_counter()
        repeat = attributor.attribute([Query.from_path(Path(q["image"]), q["prompt"]) for q in queries])
        timings["attribute (repeat)"] = time.perf_counter() - clock
        second = {"cached": attributor.stats.cached, "generated": attributor.stats.generated}
        # Queries with no prompt: described by the captioner, then resynthesized from its caption.
        uncaptioned = [q for q in queries if not q["known"]][:: len(DESCRIPTIONS) - KNOWN]
        captioned = attributor.attribute([Query.from_path(Path(q["image"])) for q in uncaptioned])
        stats = store.stats()
    labels = [(q["source"], r.predicted) for q, r in zip(queries, results)]
    assert [r.predicted for r in repeat] == [r.predicted for r in results], "cached answers must not change"
    table, accuracy = _accuracy_table(labels)
    known_acc = _accuracy_table([lab for q, lab in zip(queries, labels) if q["known"]])[1]["overall"]
    new_acc = _accuracy_table([lab for q, lab in zip(queries, labels) if not q["known"]])[1]["overall"]
    caption_acc = _accuracy_table([(q["source"], r.predicted) for q, r in zip(uncaptioned, captioned)])[1]["overall"]
    lines = [table, "",
             f"queries with resyntheses already in the store: {known_acc:.0%} correct; "
             f"with new descriptions (generated on demand): {new_acc:.0%}; "
             f"without prompt (captioned): {caption_acc:.0%}",
             f"first pass: {first['cached']} resyntheses cached, {first['generated']} generated; "
             f"repeat: {second['cached']} cached, {second['generated']} generated",
             "stage seconds (first pass): " + ", ".join(f"{k} {v:.2f}" for k, v in first["stage_seconds"].items()),
             "timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()),
             f"store: {stats['vectors']} vectors in {store_dir}"]
    report.update({"table": "\n".join(lines), "accuracy": accuracy, "accuracy_known": known_acc,
                   "accuracy_new": new_acc, "accuracy_captioned": caption_acc, "first_pass": first,
                   "repeat": second, "timings": timings, "store": stats,
                   "results": [r.to_dict() for r in results]})
    return report
