"""The live index on disk as an immutable base file plus append-only segments, so that a save writes
what changed since the last one, not every vector (8.4 s at 1M vectors before; measurements.md).

    vectors.faiss                         the base: IDMap2(FlatIP), written whole by a rewrite or rebuild
    vectors.faiss.seg-000003-1a2b3c4d     a segment: the vectors one save added, same format, mapped too
    vectors.faiss.del-000003-1a2b3c4d     the ids removed from the base and the segments (sorted int64)
    vectors.faiss.manifest.json           names the base (size, mtime, a hash of its tail), the segments
                                          and the removed-ids file, with each one's size and count

Publishing order (each write is layout.atomic_write: temporary file, fsync, rename, fsync the folder):
the new segment, then the new removed-ids file, then the manifest, then superseded files are
deleted. The manifest's rename is the commit: a crash before it leaves an unnamed file (removed under
the publish lock: `remove_orphans`), never a half state. Past MAX_SEGMENTS a save writes one segment
of them all (a merge: the same order, the old segments superseded). A rewrite (compaction, when the
segments or removed ids pass COMPACT_FRACTION of the base, and every rebuild) replaces the base first,
which makes the old manifest stale (it names another base), then drops it and its files. A stale or
broken manifest is ignored: the base alone is served and whatever it lacks is read from the database,
which is the truth, as after a crash before any save (live.py). Names are never reused (a generation
and a random token), so a reader holding an old manifest finds its files or none, never others.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
from pathlib import Path
from typing import IO, Any

import numpy as np

from index.layout import atomic_write, file_state, unlink_quietly, write_json_atomic
from index.faults import crash_point

MANIFEST_SUFFIX = ".manifest.json"
PART_RE = re.compile(r"^(?P<base>.+)\.(?P<kind>seg|del)-(?P<gen>\d{6,})-(?P<token>[0-9a-f]{8})$")
COMPACT_FRACTION = 0.25  # segments (or removed ids) beyond this share of the base: rewrite one base
MAX_SEGMENTS = 32  # every search visits each segment: past this many, a save merges them into one
TAIL = 1 << 16  # bytes of the base's end (its id map) hashed into its identity

# the crash points of a segment save, in order (tests stop a real process at each one)
POINTS = ("index:segment-before-replace", "index:removed-before-replace", "index:manifest-before-replace",
          "index:manifest-replaced")
# and of a rewrite: the base (vectors.atomic_write's point), then the old manifest dropped; a segment
# save passes "index:before-replace" too, just before its manifest is written
REWRITE_POINTS = ("index:before-replace", "index:base-replaced")


def manifest_path(index_path: Path) -> Path:
    return index_path.with_name(index_path.name + MANIFEST_SUFFIX)


def state(index_path: Path) -> tuple:
    """What other processes watch: changes when the base is replaced or a manifest published."""
    return file_state(index_path), file_state(manifest_path(index_path))


def base_identity(index_path: Path) -> dict | None:
    """Which base file a manifest was written over: size, mtime and a hash of its last 64 KiB (the
    id map). A base written since (a rewrite, a rebuild, a restored copy) has another one."""
    try:
        stat = index_path.stat()
        with open(index_path, "rb") as handle:
            handle.seek(max(0, stat.st_size - TAIL))
            tail = hashlib.blake2b(handle.read(TAIL), digest_size=8).hexdigest()
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "tail": tail}


def same_base(named: Any, identity: dict) -> bool:
    """Whether a manifest's base is this file: by size and id map. Not by mtime: `cp -r` (or a restore that keeps
    no times) gave the copy's base a new one, its segments then read as named by no manifest (verify failed,
    --repair deleted them, the vectors were read from the database). A base written since holds other ids."""
    return isinstance(named, dict) and named.get("size") == identity["size"] and named.get("tail") == identity["tail"]


def read_manifest(index_path: Path, identity: dict | None) -> tuple[dict | None, str | None]:
    """(manifest, None) when one is written over the base of `identity`; (None, why) when one is
    there but broken; (None, None) when there is none or it names an older base (stale)."""
    path = manifest_path(index_path)
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None, None
    except OSError as exc:  # a folder or a link loop in its place, denied: a save cannot replace it either
        return None, f"manifest unreadable ({exc.strerror or type(exc).__name__}: move it away)"
    except ValueError:
        return None, "manifest unreadable"
    if not isinstance(manifest, dict) or manifest.get("format") != 1:
        return None, "manifest of an unknown format"
    if identity is None or not same_base(manifest.get("base"), identity):
        return None, None
    why = malformed(index_path, manifest)
    if why:
        return None, f"manifest malformed ({why})"
    return manifest, None


def _entry_problem(index_path: Path, entry: Any, kind: str) -> str | None:
    """Why one file entry of a manifest is not {"file": a part of this index of `kind`, "n", "size"}."""
    if not isinstance(entry, dict):
        return f"a {kind} entry is not an object"
    name = entry.get("file")
    match = PART_RE.match(name) if isinstance(name, str) else None
    if match is None or match.group("base") != index_path.name or match.group("kind") != kind:
        return f"names {name!r}, not a {kind} file of {index_path.name}"
    for field in ("n", "size"):
        value = entry.get(field)
        if type(value) is not int or value < 0:
            return f"{name}: {field} {value!r}"
    return None


def malformed(index_path: Path, manifest: dict) -> str | None:
    """Why a manifest over this base is not one a save writes (every field of the right type, every file
    a distinct part of this index of the right kind), or None. Checked once when it is read, so the
    code that uses it (loading, saving, leftovers, verify) never meets a missing key or a wrong type."""
    if type(manifest.get("generation")) is not int or not isinstance(manifest.get("token"), str):
        return "generation or token"
    entries = manifest.get("segments")
    if not isinstance(entries, list):
        return "segments is not a list"
    removed = manifest.get("removed", False)
    if removed is False:
        return "no removed entry"
    for entry, kind in [(e, "seg") for e in entries] + ([(removed, "del")] if removed is not None else []):
        why = _entry_problem(index_path, entry, kind)
        if why:
            return why
    names = [e["file"] for e in entries]
    if len(set(names)) != len(names):
        return "a segment named twice"
    return None


def key(manifest: dict | None) -> tuple | None:
    """What a loaded index remembers of the manifest it maps, to tell whether the disk moved on."""
    return None if manifest is None else (manifest["generation"], manifest["token"])


def part_path(index_path: Path, entry: dict) -> Path:
    name = entry["file"]
    match = PART_RE.match(name)
    if "/" in name or match is None or match.group("base") != index_path.name:
        raise ValueError(f"manifest names {name!r}, not a part of {index_path.name}")
    return index_path.with_name(name)


def read_removed(index_path: Path, entry: dict | None) -> np.ndarray:
    """The removed-ids file a manifest names (FileNotFoundError/ValueError when it is not what it says)."""
    if entry is None:
        return np.zeros(0, np.int64)
    path = part_path(index_path, entry)
    data = path.read_bytes()
    if len(data) != entry["size"] or len(data) != 8 * entry["n"]:
        raise ValueError(f"{path.name}: {len(data)} bytes, the manifest says {entry['size']} bytes for "
                         f"{entry['n']} ids")
    ids = np.frombuffer(data, "<i8").astype(np.int64)
    if len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all()):  # a save writes them sorted and distinct
        raise ValueError(f"{path.name}: its ids are not sorted and distinct")
    return ids


def should_compact(base_rows: int, segment_rows: int, removed: int) -> bool:
    """Whether the next save rewrites one base instead of adding a segment (or merging the segments
    into one, which a save does past MAX_SEGMENTS): the amortised cost of a save stays proportional
    to what it adds, and the segments stay a small share of what a search scans."""
    limit = COMPACT_FRACTION * base_rows
    return segment_rows > limit or removed > limit


def append(index_path: Path, manifest: dict | None, write_segment: Any, added: int,
           removed: np.ndarray | None, merged: bool = False) -> dict:
    """Publish one save as a segment over the base `index_path`: `write_segment(handle)` writes the
    `added` vectors (nothing when 0); `removed`, when given, replaces the removed-ids set; `merged`: the
    new segment replaces every segment (it holds their kept rows). The caller holds the publish lock
    and has checked that `manifest` is the current one (None: the base has none yet). Returns the
    manifest published."""
    generation = (manifest["generation"] if manifest else 0) + 1
    token = secrets.token_hex(4)
    identity = manifest["base"] if manifest else base_identity(index_path)
    old = list(manifest["segments"]) if manifest else []
    segments = [] if merged else list(old)
    removed_entry = manifest["removed"] if manifest else None
    if added:
        name = f"{index_path.name}.seg-{generation:06d}-{token}"
        atomic_write(index_path.with_name(name), write_segment, POINTS[0])
        segments.append({"file": name, "n": added, "size": index_path.with_name(name).stat().st_size})
    superseded = old if merged else []
    if removed is not None:
        name = f"{index_path.name}.del-{generation:06d}-{token}"
        data = np.sort(np.asarray(removed, np.int64)).astype("<i8").tobytes()
        if removed_entry is not None:
            superseded.append(removed_entry)
        removed_entry = None
        if data:
            def write(handle: IO[bytes]) -> None:
                handle.write(data)
            atomic_write(index_path.with_name(name), write, POINTS[1])
            removed_entry = {"file": name, "n": len(data) // 8, "size": len(data)}
    new = {"format": 1, "base": identity, "generation": generation, "token": token, "segments": segments,
           "removed": removed_entry}
    crash_point(REWRITE_POINTS[0])  # "before a save commits", whichever way it publishes (the CLI tests')
    write_json_atomic(manifest_path(index_path), new, POINTS[2])
    crash_point(POINTS[3])
    for entry in superseded:  # a reader still holding the old manifest retries (vectors.read_checked)
        unlink_quietly(part_path(index_path, entry))  # after the commit: one left is a leftover, not a failure
    return new


def named_files(index_path: Path, manifest: dict | None) -> set[str]:
    if manifest is None:
        return set()
    names = {entry["file"] for entry in manifest["segments"]}
    if manifest["removed"] is not None:
        names.add(manifest["removed"]["file"])
    return names


def leftovers(index_path: Path, manifest: dict | None | bool = False) -> list[Path]:
    """Segment and removed-ids files the current manifest does not name (of this index or of an index
    file no longer live), and manifests of other index files or stale ones: a crash between writing a
    part and publishing the manifest, or a rewrite that died before its cleanup. `manifest`: the
    current one, when the caller just published it (else it is read)."""
    if manifest is False:
        manifest, _ = read_manifest(index_path, base_identity(index_path))
    assert manifest is None or isinstance(manifest, dict)
    keep = named_files(index_path, manifest) | ({manifest_path(index_path).name} if manifest else set())
    found = []
    for path in sorted(index_path.parent.iterdir()):
        name = path.name
        if name in keep or (path.is_dir() and not path.is_symlink()):  # a folder is nothing a save made
            continue
        if PART_RE.match(name) or (name.endswith(MANIFEST_SUFFIX) and name.endswith(".faiss" + MANIFEST_SUFFIX)):
            found.append(path)
    return found


def remove_orphans(index_path: Path, manifest: dict | None | bool = False) -> list[str]:
    """Delete `leftovers` (the caller holds the publish lock, so no save is between its steps)."""
    return [path.name for path in leftovers(index_path, manifest) if unlink_quietly(path)]


def summary(index_path: Path) -> dict:
    """For verify: what the manifest names (count of segments, their rows, removed ids)."""
    manifest, problem = read_manifest(index_path, base_identity(index_path))
    if manifest is None:
        stale = manifest_path(index_path).exists() and problem is None
        return {"segments": 0, "segment_vectors": 0, "removed": 0,
                "manifest": "stale" if stale else (problem or "absent")}
    return {"segments": len(manifest["segments"]), "segment_vectors": sum(e["n"] for e in manifest["segments"]),
            "removed": manifest["removed"]["n"] if manifest["removed"] else 0, "manifest": "ok",
            "generation": manifest["generation"]}
