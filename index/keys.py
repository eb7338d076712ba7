"""Normalisation and hashing: what makes two requests "the same" for the cache."""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Any, cast

from index.errors import StoreInputError

# Characters that show as nothing or change how the text around them shows, the one definition (manifests and
# the case report use it too): control characters (Cc: an ANSI escape rewrites a terminal), bidi marks,
# embeddings, overrides and isolates (U+202E shows a name backwards), zero-width space, word joiner, invisible
# operators and BOM ("sd\u200bxl" looks like "sdxl"), line and paragraph separators, and tag characters
# (invisible text). The zero-width (non-)joiners U+200C/U+200D are kept: Persian, Indic scripts and emoji need them.
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069"
                         "\ufeff\U000e0000-\U000e007f]")


def normalise_description(text: str) -> str:
    """Unicode-normalise, collapse whitespace; case is kept (prompts are case-sensitive to encoders).

    Control characters (Unicode category Cc: NUL and the other C0 codes, DEL, C1) count as whitespace,
    like tab and newline: PostgreSQL refuses NUL in text where SQLite stores it, so both backends store
    "a\x00b" as "a b". This is where every description and prompt enters the store."""
    text = unicodedata.normalize("NFC", text)
    if any(unicodedata.category(c) == "Cc" for c in text):
        text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    return " ".join(text.split())


def check_text(value: str | None, what: str, controls: bool = False) -> None:
    """Refuse text the store cannot keep identically on both backends (StoreInputError, one line).

    NUL is refused everywhere (PostgreSQL cannot store it; no file name holds it); with `controls`,
    every UNPRINTABLE character (names: a source name is shown in tables and messages, and a manifest
    refuses the same). Descriptions are normalised instead (`normalise_description`)."""
    if value is None:
        return
    bad = next((c for c in value if c == "\x00" or (controls and UNPRINTABLE.match(c))), None)
    if bad is not None:
        shown = "".join(f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" else f"\\u{ord(c):04x}"
                        if UNPRINTABLE.match(c) else c for c in value[:80])
        kind = "control" if unicodedata.category(bad) == "Cc" else "invisible or bidi"
        raise StoreInputError(f"{what} '{shown}' contains the {kind} character U+{ord(bad):04X}: remove it")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_key(description_hash: str, source_fingerprint: str, seed: int, params_hash: str | None, embedder: str,
              file_hash: str | None = None) -> str:
    """Identity of one resynthesis vector. `file_hash` only for replayed images (no generation recipe)."""
    return sha256_text(canonical_json([description_hash, source_fingerprint, seed, params_hash, embedder,
                                       file_hash]))


def image_key(role: str, description_hash: str, source_fingerprint: str, source_name: str, seed: int | None,
              params_hash: str | None, file_hash: str, embedder: str) -> str:
    """The key of any stored image, from what its row records: an original keys on its bytes; a
    resynthesis with a generation recipe (params_hash) on the recipe (the cache key); one without (a
    replayed image) on its bytes. The one definition, used by ingest and by re-keying on `reembed`."""
    if role == "original":
        return sha256_text(canonical_json(["original", file_hash, source_name, description_hash, embedder]))
    if params_hash is None:
        return cache_key(description_hash, source_fingerprint, seed if seed is not None else -1, "", embedder,
                         file_hash)
    return cache_key(description_hash, source_fingerprint, cast(int, seed), params_hash, embedder)


def known_names(names, shown: int = 12) -> str:
    """The names an "unknown source" message lists: sorted, at most `shown` of them (a store of hundreds
    pushed the rest of the line, and the CLI's "did you mean", off the screen)."""
    names = sorted(names)
    if not names:
        return "none registered"
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f", and {more} more (`resynth source list`)" if more > 0 else "")


def same_name(stored: str, given: str) -> bool:
    """A name as typed and as stored, equal up to Unicode form (NFC "café" is NFD "café")."""
    return unicodedata.normalize("NFC", stored) == unicodedata.normalize("NFC", given)
