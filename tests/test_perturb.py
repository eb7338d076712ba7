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
    for bad in ("sharpen", "jpeg=abc", "jpeg=0", "crop=1.5", "resize=-1", "social=8", "social=1080.5",
                "median=4", "median=1", "rotate=0", "rotate=60", "grey=0", "grey=2", "noise=0", "noise=300"):
        with pytest.raises(UserError):
            px.parse_perturbations(bad)


# -------------------------------------------------- the reference paper's protocol (docs/evaluation.md)

def test_existing_ladders_unchanged_and_new_kinds_in_all():
    assert list(px.LADDERS)[:5] == ["jpeg", "webp", "resize", "crop", "blur"]
    assert px.LADDERS["jpeg"] == (100, 90, 75, 50) and px.LADDERS["blur"] == (0.5, 1.0, 2.0)
    kinds = {k for k, _ in px.parse_perturbations("all")}
    assert {"social", "median", "rotate", "grey", "noise"} <= kinds
    assert px.parse_perturbations("social,grey") == [("social", 1080.0), ("social", 512.0), ("grey", 1.0)]
    assert px.parse_perturbations("rotate=-5") == [("rotate", -5.0)] and px.label("rotate", -5) == "rotate--5"


def test_social_brings_the_longest_side_to_1080_then_jpeg_85():
    big = Image.fromarray(np.random.default_rng(1).integers(0, 255, (1200, 2160, 3), dtype=np.uint8))
    out = px.transform("social", 1080)(big)
    assert out.size == (1080, 600) and out.mode == "RGB"
    # the same as resizing by hand and encoding at quality 85
    expected = px.jpeg(big.resize((1080, 600), Image.Resampling.BICUBIC), 85)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_social_leaves_a_small_image_its_size(image):
    out = px.social(image, 1080)
    assert out.size == image.size
    assert np.array_equal(np.asarray(out), np.asarray(px.jpeg(image, 85)))  # only the JPEG 85


def test_median_by_hand():
    pixels = np.full((5, 5, 3), 100, np.uint8)
    pixels[2, 2] = 255  # one salt pixel: a 3x3 median removes it
    out = np.asarray(px.median(Image.fromarray(pixels), 3))
    assert out.shape == (5, 5, 3) and (out == 100).all()


def test_rotate_keeps_size_and_no_empty_corner():
    flat = Image.new("RGB", (64, 48), (200, 120, 40))
    for degrees in (5, -10, 45):
        out = px.rotate(flat, degrees)
        assert out.size == flat.size
        # a flat image stays flat: the crop left no black fill in the corners
        assert np.abs(np.asarray(out, np.int16) - np.array([200, 120, 40])).max() <= 2, degrees
    rng = np.random.default_rng(2)
    textured = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    assert not np.array_equal(np.asarray(px.rotate(textured, 5)), np.asarray(textured))


def test_grey_by_hand(image):
    out = px.grey(image, 1.0)
    pixels = np.asarray(out)
    assert out.mode == "RGB" and out.size == image.size
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert np.array_equal(pixels[..., 0], np.asarray(image.convert("L")))
    red = Image.new("RGB", (2, 2), (255, 0, 0))
    assert np.asarray(px.grey(red, 1.0))[0, 0].tolist() == [76, 76, 76]  # 0.299 * 255, PIL's luma
    half = np.asarray(px.grey(red, 0.5))[0, 0].tolist()
    assert half == pytest.approx([165.5, 38, 38], abs=0.5)  # halfway between (255, 0, 0) and (76, 76, 76)


def test_noise_is_deterministic_per_image_and_sized_by_sigma(image):
    flat = Image.new("RGB", (100, 100), (128, 128, 128))
    a, b = px.noise(flat, 10), px.noise(flat, 10)
    assert np.array_equal(np.asarray(a), np.asarray(b))  # same image, same noise
    assert not np.array_equal(np.asarray(px.noise(flat, 10, seed=1)), np.asarray(a))
    other = Image.new("RGB", (100, 100), (120, 128, 128))
    delta = np.asarray(px.noise(other, 10), np.float64) - np.asarray(other, np.float64)
    assert not np.array_equal(delta, np.asarray(a, np.float64) - 128)  # another image, other noise
    for sigma in (5, 20):
        spread = (np.asarray(px.noise(flat, sigma), np.float64) - 128).std()
        assert spread == pytest.approx(sigma, rel=0.05)
    assert px.transform("noise", 5)(image).size == image.size
