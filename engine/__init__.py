"""resynth: attribute AI-generated images to the generator that made them, by resynthesis.

The library API is two calls; everything else is a method of the Workspace they return:

    import engine
    with engine.open("my-store") as ws:                 # or engine.init(...) to create a store
        report = ws.attribute("image.png", prompt="portrait of an old man")
        print(report.results[0].predicted)

Importing this package loads no model, no torch, and changes no environment variable or logger.
"""
from __future__ import annotations

from engine.arguments import keywords
from engine.errors import SourceError, UserError
from engine.options import Options

__all__ = ["open", "init", "Options", "UserError", "SourceError"]


@keywords
def open(store_dir=None, *, device=None, captioner=None, progress=False, writable=True, repair=False):  # noqa: A001
    """The store at `store_dir` (else $RESYNTH_STORE, else ./resynth-store) as a Workspace. Every path
    argument, here and in the Workspace's methods, may start with `~` or hold `$VAR`s.

    `repair=True` accepts the database as it is when the index holds vectors it lacks (see `verify`).
    """
    from engine.workspace import open_workspace

    return open_workspace(_path(store_dir), device=device, captioner=_path(captioner), progress=progress,
                          writable=writable, repair=repair)


@keywords
def init(store_dir=None, *, clip_checkpoint, clip_model=None, clip_config=None, clip_layer="middle",
         captioner=None, device=None, progress=False, db=None, images=None, caption_instruction=None):
    """Create a store bound to one open_clip image encoder and return it as a Workspace.

    `db`: a PostgreSQL URL (postgresql+psycopg://USER@HOST:PORT/DBNAME, no password) for the metadata.
    `images`: an object-store URL (s3://BUCKET/PREFIX, gs://...) for the generated image files.
    `caption_instruction`: what a vision-language captioner is asked about each image (kept in the store)."""
    from engine.workspace import init_workspace

    return init_workspace(_path(store_dir), clip_checkpoint=_path(clip_checkpoint), clip_model=clip_model,
                          clip_config=_path(clip_config), clip_layer=clip_layer, captioner=_path(captioner),
                          device=device, progress=progress, db=db, images=images,
                          caption_instruction=caption_instruction)


def _path(path):
    """`~` and `$VAR` expanded (engine.paths); None and "" stay as they are ("not given")."""
    from engine.paths import expand_path

    return expand_path(path) if path else path
