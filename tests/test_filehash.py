"""Whole-file weight digests remembered across processes (index/filehash.py): used when the file is unchanged,
never when it changed, and passed over whenever the cache file cannot be trusted or used."""
from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import index.filehash as filehash

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A private cache file, every file big enough to persist, and ctimes counted as settled at once."""
    where = tmp_path / "cache" / "file-hashes.sqlite"
    monkeypatch.setenv("RESYNTH_HASH_CACHE", str(where))
    monkeypatch.setattr(filehash, "PERSIST_FROM", 0)
    monkeypatch.setattr(filehash, "SETTLED_S", -5.0)
    monkeypatch.setattr(filehash, "_HASHES", {})
    return where


def weights(tmp_path: Path, data: bytes = b"\x01" * 4096) -> Path:
    path = tmp_path / "unet.safetensors"
    path.write_bytes(data)
    return path


def plant(where: Path, path: Path, digest: str) -> None:
    """Overwrite the remembered digest of `path` (what a stale or poisoned cache would hold)."""
    with sqlite3.connect(where) as connection:
        updated = connection.execute("UPDATE digests SET sha256 = ? WHERE path = ?",
                                     (digest, os.fsencode(path.resolve()))).rowcount
    assert updated == 1


def test_remembered_by_another_process_and_forgotten_when_the_file_changes(cache, tmp_path, monkeypatch):
    path = weights(tmp_path)
    true = hashlib.sha256(path.read_bytes()).hexdigest()
    code = ("import index.filehash as f, sys; f.PERSIST_FROM = 0; f.SETTLED_S = -5.0; "
            "print(f.file_sha256(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "RESYNTH_HASH_CACHE": str(cache)}, timeout=60)
    assert done.stdout.strip() == true, done.stderr
    assert oct(cache.stat().st_mode & 0o777) == "0o600" and oct(cache.parent.stat().st_mode & 0o777) == "0o700"
    plant(cache, path, "a" * 64)  # what this process now finds is the cache's word, not a new read
    assert filehash.file_sha256(path) == "a" * 64
    # the same size and mtime, new bytes in the middle: ctime moved, so the file is read again
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(2000)
        handle.write(b"\x02")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = hashlib.sha256(path.read_bytes()).hexdigest()
    assert filehash.file_sha256(path) == changed != true


def test_a_file_written_just_now_is_not_remembered(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(filehash, "SETTLED_S", 60.0)  # a write within the same timestamp tick could hide
    path = weights(tmp_path)
    assert filehash.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not cache.exists() and filehash._HASHES == {}


@pytest.mark.parametrize("spoil", ["group-writable", "other-user", "open-folder", "planted-journal", "damaged",
                                   "not-sqlite", "locked", "unwritable", "off"])
def test_a_cache_that_cannot_be_trusted_or_used_is_passed_over(cache, tmp_path, monkeypatch, spoil):
    path = weights(tmp_path)
    true = hashlib.sha256(path.read_bytes()).hexdigest()
    assert filehash.file_sha256(path) == true
    plant(cache, path, "b" * 64)
    filehash._HASHES.clear()
    holder = None
    if spoil == "group-writable":
        cache.chmod(0o620)
    elif spoil == "other-user":
        if os.geteuid() != 0:
            pytest.skip("needs root to give the file to another user")
        os.chown(cache, 65534, -1)
    elif spoil == "open-folder":  # where another user could plant a hot journal SQLite plays back
        cache.parent.chmod(0o777)
    elif spoil == "planted-journal":
        if os.geteuid() != 0:
            pytest.skip("needs root to give the file to another user")
        journal = cache.with_name(cache.name + "-journal")
        journal.write_bytes(b"")
        os.chown(journal, 65534, -1)
    elif spoil == "damaged":
        cache.write_bytes(b"SQLite format 3\0" + b"\xff" * 4000)
    elif spoil == "not-sqlite":  # RESYNTH_HASH_CACHE naming a user's own file by mistake
        cache.write_bytes(b"my notes\n" * 100)
    elif spoil == "locked":  # another process mid-write: waited on for 0.2 s at most, then hashed
        holder = sqlite3.connect(cache, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
    elif spoil == "unwritable":
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        monkeypatch.setenv("RESYNTH_HASH_CACHE", str(blocker / "cache.sqlite"))
    elif spoil == "off":
        monkeypatch.setenv("RESYNTH_HASH_CACHE", "off")
    start = time.monotonic()
    assert filehash.file_sha256(path) == true  # never the planted digest, never an error
    assert time.monotonic() - start < 5
    if holder is not None:
        holder.close()
    if spoil == "not-sqlite":  # passed over, never deleted
        assert cache.read_bytes() == b"my notes\n" * 100
    if spoil == "damaged":  # the damaged file was ours: removed, and the next digest is remembered again
        filehash._HASHES.clear()
        assert filehash.file_sha256(path) == true and cache.exists()
        with sqlite3.connect(cache) as connection:
            assert connection.execute("SELECT sha256 FROM digests").fetchall() == [(true,)]


def test_a_file_name_that_is_not_utf8_is_remembered(cache, tmp_path):
    path = Path(os.fsdecode(bytes(tmp_path) + b"/unet-\xff.safetensors"))
    path.write_bytes(b"\x03" * 100)
    true = hashlib.sha256(path.read_bytes()).hexdigest()
    assert filehash.file_sha256(path) == true
    filehash._HASHES.clear()
    plant(cache, path, "c" * 64)
    assert filehash.file_sha256(path) == "c" * 64  # found again by its name's bytes
