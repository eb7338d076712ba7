"""Opening a store together with the models it is bound to: the library API the CLI is thin over."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from engine.describe import Captioner
from engine.embed import Embedder, EmbedderSpec
from engine.errors import UserError
from engine.generate import (DiffusersGenerator, GenerationParams, check_pipeline_folder, check_scheduler,
                             fingerprint_folder, source_fingerprint)
from index.store import Store

DEFAULT_STORE = "resynth-store"


def store_path(explicit: str | None) -> Path:
    """--store, else $RESYNTH_STORE, else ./resynth-store."""
    return Path(explicit or os.environ.get("RESYNTH_STORE") or DEFAULT_STORE)


def init_store(root: Path, spec: EmbedderSpec, captioner: str | None = None) -> Store:
    """Create a store bound to one embedder (loading it once, to validate it and learn its identity)."""
    if captioner:
        Captioner(Path(captioner))  # validates the folder now rather than at the first query
    embedder = Embedder(spec)
    store = Store.create(root, embedder.describe(), embedder.dim,
                         captioner=str(Path(captioner).resolve()) if captioner else None)
    return store


def load_embedder(store: Store, device: str | None = None) -> Embedder:
    """The store's embedder; refuses weights that changed since the store was bound to them."""
    config = store.config["embedder"]
    embedder = Embedder(EmbedderSpec.from_dict(config), device=device, known_hash=config.get("checkpoint_hash"))
    if embedder.identity != store.embedder_identity:
        raise UserError(f"store {store.root} is bound to embedder {store.embedder_identity}, but "
                        f"{config['checkpoint']} is now {embedder.identity}")
    return embedder


def load_generators(store: Store, device: str | None = None) -> dict[str, DiffusersGenerator]:
    """Lazy generators for every pipeline source (a pipeline loads only when it must generate)."""
    return {s.name: DiffusersGenerator(s.name, Path(s.path), GenerationParams.from_json(s.params_json), device)
            for s in store.sources() if s.kind == "diffusers"}


def load_captioner(store: Store, override: str | None = None) -> Captioner | None:
    folder = override or store.config.get("captioner")
    return Captioner(Path(folder)) if folder else None


def add_pipeline_source(store: Store, name: str, folder: Path, params: GenerationParams) -> dict:
    """Register a diffusers pipeline folder as a source, after checking it loads as text-to-image."""
    _check_name(name)
    folder = Path(folder).resolve()
    check_pipeline_folder(folder)
    check_scheduler(params.scheduler)
    if params.steps < 1 or (params.size is not None and (params.size < 8 or params.size % 8)):
        raise UserError("--steps must be >= 1 and --size a multiple of 8")
    model_hash = fingerprint_folder(folder)
    fingerprint = source_fingerprint("diffusers", name, model_hash, params)
    source = store.add_source(name, "diffusers", fingerprint, path=str(folder), params=asdict(params))
    return {"name": source.name, "kind": source.kind, "path": source.path, "fingerprint": fingerprint}


def add_replay_source(store: Store, name: str) -> None:
    _check_name(name)
    store.add_source(name, "replay", source_fingerprint("replay", name, None, None))


def _check_name(name: str) -> None:
    if not name or not name.strip() or len(name) > 200 or any(c in name for c in "/\\\0\n"):
        raise UserError(f"invalid source name {name!r}: use a short name without slashes")
