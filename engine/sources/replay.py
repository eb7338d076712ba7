"""Replay: a source whose resyntheses come from a dataset (a published set's images); never generates."""
from __future__ import annotations

from engine.sources import Recipe, SourceKind, fingerprint


class Replay(SourceKind):
    name = "replay"
    summary = ("a source whose resyntheses come from a dataset (ingest enrols one for each source it does not "
               "know); it never generates")
    generates = False
    needs_gpu = False
    reenrol = True  # every ingest naming it enrols it again: the same source

    def prepare(self, name: str) -> Recipe:
        return Recipe(path=None, params=None, fingerprint=fingerprint("replay", name))

    def describe_recipe(self, params: dict, path: str | None) -> str:
        return "replays stored images (never generates)"
