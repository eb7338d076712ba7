"""Replay: a source whose resyntheses come from a dataset (a published set's images); never generates."""
from __future__ import annotations

from engine.sources import Recipe, SourceKind, fingerprint


class Replay(SourceKind):
    name = "replay"
    generates = False
    needs_gpu = False
    reenrol = True  # every ingest naming it enrols it again: the same source

    def prepare(self, name: str) -> Recipe:
        return Recipe(path=None, params=None, fingerprint=fingerprint("replay", name))
