"""The models a Workspace is bound to, loaded on first use: its embedder, captioner and generators.

At most `max_loaded` generators that hold device memory stay resident (least recently used unloaded).
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from engine import sources
from engine.errors import SourceError, UserError

if TYPE_CHECKING:
    from engine.describe import Describer
    from engine.embed import Embedder
    from engine.workspace import Workspace


# Loading a model is not thread-safe across libraries: diffusers and transformers build modules on torch's
# "meta" device under a process-wide patch (accelerate's init_empty_weights), so a model another thread
# builds meanwhile gets meta tensors ("Unsupported device type 'meta'"). Every load here takes this lock.
LOADING = threading.RLock()


class Models:
    def __init__(self, ws: "Workspace", captioner: str | None, embedder: "Embedder | None"):
        self.ws = ws  # its store, device, sources and max_loaded (the service sets that)
        self.captioner_folder = captioner
        self._embedder = embedder
        self._captioner: Describer | None = None
        self.generators: dict = {}
        self._resident: list = []
        self._lock = threading.RLock()
        self._in_use: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # generator -> its Lock

    def embedder(self) -> "Embedder":
        """The store's embedder; refuses weights that changed since the store was bound to them."""
        with self._lock:
            if self._embedder is None:
                from engine.embed import Embedder, EmbedderSpec

                store = self.ws.store
                config = store.config["embedder"]
                with LOADING:
                    embedder = Embedder(EmbedderSpec.from_dict(config), device=self.ws.device,
                                        known_hash=config.get("checkpoint_hash"))
                if embedder.identity != store.embedder_identity:
                    raise UserError(f"store {store.root} is bound to embedder {store.embedder_identity}, but "
                                    f"{config['checkpoint']} is now {embedder.identity}")
                self._embedder = embedder
            return self._embedder

    def use_embedder(self, embedder: "Embedder") -> None:
        with self._lock:
            self._embedder = embedder

    def captioner(self) -> "Describer | None":
        with self._lock:
            folder = self.captioner_folder or self.ws.store.config.get("captioner")
            if folder and (self._captioner is None or not _same_folder(self._captioner.folder, folder)):
                from engine.describe import make_captioner

                with LOADING:
                    self._captioner = make_captioner(Path(folder), device=self.ws.device,
                                                     instruction=self.ws.store.config.get("caption_instruction"))
            return self._captioner if folder else None

    def generator(self, name: str):
        """The lazy generator of a source that generates (a pipeline loads only when it must generate)."""
        with self._lock:
            source = next((s for s in self.ws.sources() if s.name == name), None)
            if source is None:  # removed by another process since this request was planned
                self.ws.sources_changed()
                raise SourceError(name, "was removed from the store during this request")
            kind = sources.kind_of(source)
            if not kind.generates:
                raise UserError(f"source {name!r} has no pipeline to generate with")
            kept = self.generators.get(name)
            if kept is None or kept.fingerprint != source.fingerprint:
                kept = self.generators[name] = kind.load(source, self.ws.device)
            return kept

    @contextmanager
    def generating(self, generator) -> Iterator[None]:
        """Hold a local pipeline's generator for one run of jobs: threads of one process (the library's
        callers) take turns, since a pipeline's scheduler keeps the state of the run in progress. Room is
        made for it under its hold (so no other thread drops it as idle meanwhile); its files are checked
        before, and it loads under, LOADING; pipelines kept past `max_loaded` while busy go after the run."""
        with self._lock:
            lock = self._in_use.setdefault(generator, threading.Lock())
        with lock:
            try:
                self.make_room_for(generator)
                if not getattr(generator, "loaded", True):
                    check = getattr(generator, "check_unchanged", None)
                    if check is not None:  # hashing weights takes seconds: other threads load meanwhile
                        check()
                    with LOADING:
                        generator.load()
                yield
            finally:
                self._trim()

    def _busy(self, generator) -> bool:
        return generator in self._in_use and self._in_use[generator].locked()

    def _trim(self) -> None:
        """Unload the least recently used idle pipelines beyond `max_loaded` (kept while they were busy)."""
        with self._lock:
            over = len(self._resident) - max(1, self.ws.max_loaded)
            for stale in [g for g in self._resident if not self._busy(g)][:max(0, over)]:
                stale.unload()
                self._resident.remove(stale)

    def forget(self, name: str) -> None:
        with self._lock:
            self.generators.pop(name, None)

    def make_room_for(self, generator) -> None:
        """Unload the least recently used pipelines so that at most `max_loaded` are resident."""
        from engine.sources.lora import BASES

        with self._lock:
            keep = max(1, self.ws.max_loaded)
            self._resident = [g for g in self._resident if g is not generator] + [generator]
            busy = [g for g in self._resident[:-keep] if self._busy(g)]
            for stale in self._resident[:-keep]:
                if stale not in busy:  # one another thread is generating with unloads after its run (_trim)
                    stale.unload()
            self._resident = busy + self._resident[-keep:]
            if len(self._resident) >= keep:  # no room for a LoRA base kept idle beside them
                BASES.drop_idle(keep_for=generator)


def _same_folder(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
