"""Helpers the tests share, importable as `tests.helpers` from any working directory (tests/ is a package)."""
from __future__ import annotations


def run_cli(*argv) -> int:
    """Run a resynth command in this process, as a user would type it; returns its exit code."""
    from engine.cli import main

    return main([str(a) for a in argv])


def db_args(db) -> list:
    """`resynth init` arguments for the backend `db` (the `db` fixture: nothing for SQLite)."""
    return ["--db", db] if db else []


def dataset_subset(manifest, root, descriptions: int, resynthesized: int | None = None):
    """The rows of write_dataset's manifest for its first `descriptions` descriptions (resyntheses only for
    the first `resynthesized`), files copied into `root`: what write_dataset writes for those arguments,
    since each image's seed depends only on its description's place and its seed, without generating."""
    import json
    import shutil
    from pathlib import Path

    from engine.zoo import DESCRIPTIONS

    manifest, root = Path(manifest), Path(root)
    rows = []
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        place = DESCRIPTIONS.index(row["description"])
        if place >= descriptions or (row["role"] == "resynthesis" and resynthesized is not None
                                     and place >= resynthesized):
            continue
        (root / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.parent / row["image"], root / row["image"])
        rows.append(row)
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
