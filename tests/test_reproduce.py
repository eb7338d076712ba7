"""Redrawing an image from the recipe its own metadata gives: on the enrolled source that made it, the
same seed redraws it pixel for pixel ("reproduced"); metadata naming another enrolled source is stated
as a conflict ("not reproduced"); the ranking is never changed, and a repeat costs no generation."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image, PngImagePlugin

import engine
from engine import Options
from engine.provenance.reproduce import scheduler_for
from tests.helpers import run_cli

ONE = Options(per_source=1, adaptive=False)


def a1111_png(image_path, out, prompt: str, model: str, seed: int = 500, sampler: str = "DDIM",
              extra: str = "") -> str:
    """The pixels of `image_path` with an AUTOMATIC1111 `parameters` chunk giving this recipe."""
    with Image.open(image_path) as im:
        w, h = im.size
        pixels = im.convert("RGB")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"{prompt}\nSteps: 2, Sampler: {sampler}, CFG scale: 7, Seed: {seed}, "
                                f"Size: {w}x{h}, Model: {model}{extra}, Version: v1.10.1")
    pixels.save(out, "PNG", pnginfo=info)
    return str(out)


def comfy_graph(prompt: str, checkpoint: str, side: int = 64) -> dict:
    """A ComfyUI executed prompt graph: checkpoint -> text encoders -> KSampler -> decode -> save."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": side, "height": side, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 500, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
                                                    "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                    "positive": ["6", 0], "negative": ["7", 0],
                                                    "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def test_a_recipe_redraws_its_image_on_the_source_that_made_it_and_not_on_another(store_dir, originals, tmp_path,
                                                                                  capsys):
    # originals[0] was drawn by tiny-sd-ddim at seed 500 with 2 steps, guidance 7 (tests/conftest.py)
    query = originals[0]
    assert query["source"] == "tiny-sd-ddim"
    right = a1111_png(query["image"], tmp_path / "right.png", query["prompt"], "tiny-sd-ddim.safetensors")
    wrong = a1111_png(query["image"], tmp_path / "wrong.png", query["prompt"], "tiny-sdxl-dpm")
    adaptive = Options(per_source=2)  # its rounds rank without redrawing (a redraw there read "cached" after)
    with engine.open(store_dir) as ws:
        first = ws.attribute(right, options=adaptive).results[0]
        claim = first.evidence["provenance"]
        done = claim["reproduction"]
        assert claim["enrolled"] == "tiny-sd-ddim" and done["state"] == "reproduced", done
        assert done["source"] == "tiny-sd-ddim" and done["cached"] is False
        assert done["similarity"]["psnr_db"] == done["similarity"]["psnr_lowpass_db"] == 100.0
        assert done["similarity"]["mean_abs_diff"] == 0.0
        assert done["similarity"]["clip_cosine"] > 0.999
        assert done["recipe"]["seed"] == 500 and done["recipe"]["sampler"] == "DDIMScheduler"
        assert claim["conclusion"].startswith("agreement" if first.predicted == "tiny-sd-ddim" else "conflict")

        # A repeat finds the redraw stored: no generation, the same figures, the ranking untouched.
        calls = sum(ws.generator_calls.values())
        again = ws.attribute(right, options=adaptive).results[0]
        assert sum(ws.generator_calls.values()) == calls
        assert again.evidence["provenance"]["reproduction"] == {**done, "cached": True}
        assert [(s.source, s.score) for s in again.scores] == [(s.source, s.score) for s in first.scores]

        # The same pixels claiming another enrolled source: a conflict, stated, ranking unchanged.
        other = ws.attribute(wrong, options=ONE).results[0]
        bad = other.evidence["provenance"]["reproduction"]
        assert bad["state"] == "not reproduced" and bad["source"] == "tiny-sdxl-dpm"
        assert bad["similarity"]["psnr_lowpass_db"] < 28 and bad["similarity"]["psnr_db"] < 20
        assert other.evidence["provenance"]["conclusion"].startswith("conflict")
        assert other.predicted == first.predicted

        # A JPEG-recompressed copy of the right image (saved again as PNG with the same chunk) still
        # reproduces: the decision is on the low-passed PSNR, recompression noise is high-frequency.
        buffer = io.BytesIO()
        Image.open(query["image"]).convert("RGB").save(buffer, "JPEG", quality=85)
        Image.open(io.BytesIO(buffer.getvalue())).save(tmp_path / "recompressed-pixels.png")
        recompressed = a1111_png(tmp_path / "recompressed-pixels.png", tmp_path / "recompressed.png", query["prompt"],
                                 "tiny-sd-ddim")
        got = ws.attribute(recompressed, options=ONE).results[0].evidence["provenance"]["reproduction"]
        assert got["state"] == "reproduced" and got["cached"] is True and got["similarity"]["psnr_db"] < 28, got

        # Forged metadata: the right model, another seed.
        forged = a1111_png(query["image"], tmp_path / "forged.png", query["prompt"], "tiny-sd-ddim", seed=77)
        assert ws.attribute(forged, options=ONE).results[0].evidence["provenance"]["reproduction"]["state"] \
            == "not reproduced"

        # A ComfyUI prompt graph gives the recipe too (sampler "euler", scheduler "normal").
        euler = next(o for o in originals if o["source"] == "tiny-sd-euler" and o["prompt"] == query["prompt"])
        comfy = tmp_path / "comfy.png"
        info = PngImagePlugin.PngInfo()
        info.add_text("prompt", json.dumps(comfy_graph(query["prompt"], "tiny-sd-euler.safetensors")))
        Image.open(euler["image"]).convert("RGB").save(comfy, "PNG", pnginfo=info)
        got = ws.attribute(comfy, options=ONE).results[0].evidence["provenance"]
        assert got["enrolled"] == "tiny-sd-euler" and got["reproduction"]["state"] == "reproduced", got
        assert got["reproduction"]["recipe"]["sampler"] == "EulerDiscreteScheduler"

        # A sampler with no diffusers counterpart, and a hires-fix recipe: said, nothing drawn.
        calls = sum(ws.generator_calls.values())
        odd = a1111_png(query["image"], tmp_path / "odd.png", query["prompt"], "tiny-sd-ddim", sampler="DPM++ 2S a")
        got = ws.attribute(odd, options=ONE).results[0].evidence["provenance"]["reproduction"]
        assert got == {"state": "not reproducible", "why": "recipe not reproducible (unknown sampler 'DPM++ 2S a')"}
        hires = a1111_png(query["image"], tmp_path / "hires.png", query["prompt"], "tiny-sd-ddim",
                          extra=", Hires upscale: 2, Denoising strength: 0.5")
        got = ws.attribute(hires, options=ONE).results[0].evidence["provenance"]["reproduction"]
        assert got["state"] == "not reproducible" and "Hires upscale" in got["why"]
        assert sum(ws.generator_calls.values()) == calls
        # Dataset mode generates nothing, the redraw included.
        got = ws.attribute(right, options=Options(mode="dataset")).results[0].evidence["provenance"]["reproduction"]
        assert got["state"] == "skipped"

    # The CLI's JSON and text carry it.
    capsys.readouterr()
    assert run_cli("attribute", right, "--store", store_dir, "--json", "--quiet", "--per-source", 1) == 0
    data = json.loads(capsys.readouterr().out)["results"][0]
    assert data["evidence"]["provenance"]["reproduction"]["state"] == "reproduced"
    page = tmp_path / "case.html"
    assert run_cli("attribute", wrong, "--store", store_dir, "--quiet", "--per-source", 1, "--report", page) == 0
    assert "not reproduced" in capsys.readouterr().out
    assert "provenance: conflict: the file claims tiny-sdxl-dpm" in page.read_text()

    # The HTTP answer is the same dict (the redraw is stored by now: no generation).
    fastapi = pytest.importorskip("fastapi")  # noqa: F841
    from fastapi.testclient import TestClient

    from engine.service.app import create_app
    from engine.service.config import Limits
    from engine.service.core import Service

    with TestClient(create_app(Service.open(store_dir, Limits()), None), raise_server_exceptions=False) as client:
        with open(right, "rb") as handle:
            answer = client.post("/v1/attribute", files={"image": ("right.png", handle.read(), "image/png")},
                                 data={"per_source": "1", "adaptive": "false"})
    assert answer.status_code == 200, answer.text
    got = answer.json()["results"][0]["evidence"]["provenance"]
    assert got["reproduction"] == {**done, "cached": True} and got["conclusion"] == claim["conclusion"]


@pytest.mark.parametrize("sampler, schedule, expected", [
    ("Euler a", None, ("EulerAncestralDiscreteScheduler", {})),
    ("DPM++ 2M Karras", None, ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})),
    ("DPM++ 2M", "Karras", ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})),
    ("dpmpp_2m_sde", "normal", ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"})),
    ("DDIMScheduler", None, ("DDIMScheduler", {})),
    ("dpmpp_2m_sde_gpu", "karras", ("DPMSolverMultistepScheduler",  # Fooocus, ComfyUI
                                    {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True})),
    ("k_euler_ancestral", None, ("EulerAncestralDiscreteScheduler", {})),  # NovelAI
    ("Euler a", "exponential", "unknown schedule type 'exponential' for sampler 'Euler a'"),
    ("Restart", None, "unknown sampler 'Restart'"),
])
def test_front_end_sampler_names_map_to_diffusers_schedulers(sampler, schedule, expected):
    assert scheduler_for(sampler, schedule) == expected
