"""Shared fixtures: one tiny model zoo per test session, fresh stores per test."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental download fails loudly instead of hanging
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from engine import zoo  # noqa: E402
from engine.generate import DiffusersGenerator, GenerationParams  # noqa: E402
from engine.images import save_png_atomic  # noqa: E402

PROMPTS = [
    "portrait of an old man with a beard",
    "a young woman with red hair",
    "a child in a blue hat",
    "a man with glasses in a dark room",
    "an elderly woman smiling",
]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict:
    """Tiny random pipelines, CLIP and captioner written as ordinary model folders."""
    return zoo.write_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def originals(models, tmp_path_factory) -> list[dict]:
    """One image per (source, prompt), with a seed no resynthesis uses: the images to attribute."""
    root = tmp_path_factory.mktemp("originals")
    rows = []
    for name, folder in models["pipelines"].items():
        generator = DiffusersGenerator(name, folder, GenerationParams(steps=2))
        for i, prompt in enumerate(PROMPTS):
            path = root / name / f"{i}.png"
            save_png_atomic(generator.generate(prompt, [500 + i])[0], path)
            rows.append({"image": path, "source": name, "prompt": prompt})
    return rows


@pytest.fixture(scope="session")
def zoo_dataset(models, tmp_path_factory) -> Path:
    """Every zoo source x 8 descriptions: one original and 2 resyntheses (seeds 0, 1) per pair, generated
    once per session; a module takes its own copy of the part it needs (tests.helpers.dataset_subset)."""
    from engine.evaluation.synthetic import write_dataset

    return write_dataset(models["pipelines"], tmp_path_factory.mktemp("zoo-set"), seeds=(0, 1))


from tests.helpers import run_cli  # noqa: E402,F401  (re-exported for older imports)


@pytest.fixture
def store_dir(models, tmp_path) -> Path:
    """A store bound to the tiny CLIP with every tiny pipeline registered (2 inference steps)."""
    path = tmp_path / "store"
    assert run_cli("init", "--store", path, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"]) == 0
    for name, folder in models["pipelines"].items():
        assert run_cli("source", "add", name, folder, "--store", path, "--steps", 2) == 0
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request):
    """The store's metadata backend: None (metadata.sqlite) or the URL of a fresh PostgreSQL database on a
    real server (tests/pg.py), dropped after the test. Skipped, with the reason, only if no server can be had."""
    if request.param == "sqlite":
        yield None
        return
    from tests import pg

    if not pg.admin_url():
        pytest.skip(pg.why())
    url = pg.create_database()
    try:
        yield url
    finally:
        pg.drop_database(url)


@pytest.fixture
def copy_of(tmp_path):
    def copy(path: Path, name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(path, target) if Path(path).is_dir() else shutil.copy(path, target)
        return target
    return copy
