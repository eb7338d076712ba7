"""Normalisation and hashing: what makes two requests "the same" for the cache."""
from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path
from typing import Any


def normalise_description(text: str) -> str:
    """Unicode-normalise, collapse whitespace; case is kept (prompts are case-sensitive to encoders)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


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


def cache_key(description_hash: str, source_fingerprint: str, seed: int, params_hash: str, embedder: str,
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
    return cache_key(description_hash, source_fingerprint, seed, params_hash, embedder)
