"""Query post-processing: each transform does what its strength says; bad specs are one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.errors import UserError
from engine.evaluation import perturb as px


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))


def test_geometry(image):
    assert px.resize(image, 0.5).size == (24, 32)
    assert px.resize(image, 2.0).size == (96, 128)
    cropped = px.center_crop(image, 0.5)
    assert cropped.size == (24, 32)
    assert np.array_equal(np.asarray(cropped), np.asarray(image)[16:48, 12:36])


def test_codecs_and_blur_degrade_with_strength(image):
    pixels = np.asarray(image, dtype=np.float64)
    error = lambda out: np.abs(np.asarray(out, dtype=np.float64) - pixels).mean()  # noqa: E731
    for kind in ("jpeg", "webp"):
        mild, harsh = px.transform(kind, 95)(image), px.transform(kind, 30)(image)
        assert mild.size == image.size and mild.mode == "RGB"
        assert 0 < error(mild) < error(harsh)
    assert 0 < error(px.blur(image, 0.5)) < error(px.blur(image, 2.0))


def test_parse():
    assert px.parse_perturbations(None) == []
    assert px.parse_perturbations("jpeg=60,resize=0.5") == [("jpeg", 60.0), ("resize", 0.5)]
    assert px.parse_perturbations("blur") == [("blur", s) for s in px.LADDERS["blur"]]
    every = px.parse_perturbations("all")
    assert {k for k, _ in every} == set(px.LADDERS) and len(every) == sum(map(len, px.LADDERS.values()))
    for bad in ("sharpen", "jpeg=abc", "jpeg=0", "crop=1.5", "resize=-1"):
        with pytest.raises(UserError):
            px.parse_perturbations(bad)
