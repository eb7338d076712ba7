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
