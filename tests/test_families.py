"""Pipeline families beyond the zoo's SD 1.x / SDXL: tiny random SD3, Flux and PixArt-Sigma folders (built from
configs by scripts/tiny_families.py, tokenizers made offline) are enrolled, generate and are told apart through the
CLI; pipelines that are not text-to-image by themselves are refused at `source add`, in one line."""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest

from engine.generate import DiffusersGenerator, GenerationParams, call_arguments, not_text_to_image, wants_bfloat16
from engine.images import save_png_atomic
from tests.helpers import run_cli

FAMILIES = ("sd3", "flux", "pixart-sigma")
PROMPT = "portrait of an old man with a grey beard"


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory) -> dict[str, Path]:
    from scripts.tiny_families import write_family

    root = tmp_path_factory.mktemp("families")
    return {name: write_family(name, root / name, seed=i) for i, name in enumerate(FAMILIES)}


def test_families_enrol_generate_and_attribute(models, family_folders, tmp_path, capsys):
    store = tmp_path / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"]) == 0
    for name, folder in family_folders.items():
        assert run_cli("source", "add", name, folder, "--store", store, "--steps", 2, "--guidance", 3.5,
                       "--size", 32) == 0, name
    query = tmp_path / "q.png"  # made by the Flux source's own recipe, with a seed no resynthesis uses
    flux = DiffusersGenerator("flux", family_folders["flux"], GenerationParams(steps=2, guidance=3.5, size=32))
    save_png_atomic(flux.generate(PROMPT, [777])[0], query)
    capsys.readouterr()
    answers = []
    for _ in range(2):  # one resynthesis per source: enough to tell three random models apart
        assert run_cli("attribute", query, "--prompt", PROMPT, "--store", store, "--per-source", 1, "--json") == 0
        answers.append(json.loads(capsys.readouterr().out))
    first, second = answers
    assert first["results"][0]["predicted"] == "flux"
    assert {score["source"] for score in first["results"][0]["scores"]} == set(FAMILIES)
    assert first["cache"] == {"cached": 0, "generated": len(FAMILIES)}
    assert second["cache"] == {"cached": len(FAMILIES), "generated": 0}
    assert second["results"][0]["predicted"] == "flux"


@pytest.fixture(scope="module")
def bare_store(models, tmp_path_factory) -> Path:
    """A store for the `source add` checks below (each adds under its own name, if at all)."""
    store = tmp_path_factory.mktemp("bare") / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"]) == 0
    return store


def _relabelled(models, folder: Path, **index) -> Path:
    """A copy of a zoo folder whose model_index.json names another pipeline class or components."""
    shutil.copytree(models["pipelines"]["tiny-sd-ddim"], folder)
    stored = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**stored, **index}))
    return folder


def test_stages_and_other_media_are_refused_at_source_add(models, bare_store, tmp_path, capsys):
    # each was enrolled, then failed at its first generation (a prior's embeddings have no .images)
    for class_name, why in (("KandinskyV22PriorPipeline", "a prior makes image embeddings"),
                            ("StableCascadeDecoderPipeline", "it also needs image_embeddings"),
                            ("WanPipeline", "it returns frames, not images"), ("AudioLDM2Pipeline", "it makes audio")):
        folder = _relabelled(models, tmp_path / class_name, _class_name=class_name)
        assert run_cli("source", "add", "x", folder, "--store", bare_store) == 2
        err = capsys.readouterr().err.strip()
        assert f"holds a {class_name}, not a text-to-image pipeline: {why}" in err and len(err.splitlines()) == 1


def test_text_to_image_pipelines_with_optional_reference_images_are_accepted():
    import diffusers

    # Flux.2 and Qwen-Image 2.1 take an optional `image` (references); they were refused as image editors
    for name in ("Flux2Pipeline", "QwenImage21Pipeline", "FluxPipeline", "StableDiffusion3Pipeline",
                 "KandinskyV22CombinedPipeline", "StableCascadeCombinedPipeline"):
        if hasattr(diffusers, name):
            assert not_text_to_image(getattr(diffusers, name)) is None, name
    assert not_text_to_image(diffusers.StableDiffusionImg2ImgPipeline) == "it edits an input image"


def test_true_cfg_pipelines_get_the_recipe_guidance():
    import diffusers

    qwen = inspect.signature(diffusers.QwenImagePipeline.__call__).parameters
    args = call_arguments(qwen, GenerationParams(steps=2, guidance=4.0), 1)
    # Qwen-Image guides by true_cfg_scale, and only with a negative prompt: guidance_scale alone was ignored
    assert args["true_cfg_scale"] == 4.0 and "guidance_scale" not in args and args["negative_prompt"] == [" "]
    assert "negative_prompt" not in call_arguments(qwen, GenerationParams(guidance=1.0), 1)
    flux = inspect.signature(diffusers.FluxPipeline.__call__).parameters  # distilled guidance stays guidance_scale
    args = call_arguments(flux, GenerationParams(guidance=3.5), 2)
    assert args["guidance_scale"] == 3.5 and "true_cfg_scale" not in args and "negative_prompt" not in args
    for name, key in (("QwenImage21Pipeline", "true_cfg_scale"), ("StableCascadeCombinedPipeline",
                                                                 "prior_guidance_scale")):
        if hasattr(diffusers, name):  # no guidance_scale at all: the recipe's guidance was dropped
            args = call_arguments(inspect.signature(getattr(diffusers, name).__call__).parameters,
                                  GenerationParams(guidance=4.0), 1)
            assert args[key] == 4.0 and "guidance_scale" not in args, name
    pixart = inspect.signature(diffusers.PixArtSigmaPipeline.__call__).parameters  # the same on every machine
    assert call_arguments(pixart, GenerationParams(), 1)["clean_caption"] is False


def test_recipes_a_pipeline_cannot_follow_are_refused_or_warned_at_source_add(models, bare_store, tmp_path, capsys):
    # CogView4 refuses sides that are not multiples of 16 at each generation: the source was enrolled, never scored
    folder = _relabelled(models, tmp_path / "cogview4", _class_name="CogView4Pipeline")
    assert run_cli("source", "add", "c", folder, "--store", bare_store, "--size", 40) == 2
    assert "--size 40 is not a multiple of 16: a CogView4Pipeline refuses" in capsys.readouterr().err
    assert run_cli("source", "add", "c", folder, "--store", bare_store, "--size", 48) == 0
    # LCM takes no negative prompt: the recipe would name one that no image was made with
    folder = _relabelled(models, tmp_path / "lcm", _class_name="LatentConsistencyModelPipeline")
    assert run_cli("source", "add", "l", folder, "--store", bare_store, "--negative-prompt", "blurry") == 2
    assert "a LatentConsistencyModelPipeline takes no negative prompt" in capsys.readouterr().err
    # HunyuanDiT makes --size 32 at 1024: enrolled, with a warning saying so
    folder = _relabelled(models, tmp_path / "hunyuan", _class_name="HunyuanDiTPipeline")
    assert run_cli("source", "add", "h", folder, "--store", bare_store, "--size", 32, "--steps", 2,
                   "--guidance", 5) == 0
    assert "generates only its own shapes (squares of 1024 or 1280): --size 32 is made" in capsys.readouterr().err


def test_a_combined_pipeline_without_weights_is_refused_at_source_add(models, bare_store, tmp_path, capsys):
    # Kandinsky's movq and prior components were not looked at: a configs-only folder was enrolled
    folder = _relabelled(models, tmp_path / "kandinsky", _class_name="KandinskyV22CombinedPipeline",
                         movq=["diffusers", "VQModel"])
    (folder / "movq").mkdir()
    (folder / "movq" / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    assert run_cli("source", "add", "k", folder, "--store", bare_store) == 2
    assert "no weight files (*.safetensors, *.bin) in movq" in capsys.readouterr().err


def test_a_pipeline_needing_a_missing_package_is_refused_at_source_add(models, bare_store, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed: Kolors' tokenizer can load")
    # Kolors' model_index names diffusers' own ChatGLM classes (no remote code); diffusers exports a placeholder
    # KolorsPipeline without sentencepiece, which was refused as "not a diffusers pipeline class"
    folder = _relabelled(models, tmp_path / "kolors", _class_name="KolorsPipeline",
                         tokenizer=["kolors", "ChatGLMTokenizer"], text_encoder=["kolors", "ChatGLMModel"])
    assert run_cli("source", "add", "kolors", folder, "--store", bare_store) == 2
    assert "needs the Python package sentencepiece, not installed here" in capsys.readouterr().err


def test_families_that_overflow_float16_run_in_bfloat16_on_a_gpu():
    # Qwen-Image and Z-Image give NaN latents (black images) in float16; they ran in it on CUDA
    for name in ("QwenImagePipeline", "ZImagePipeline", "HiDreamImagePipeline", "FluxPipeline", "Flux2KleinPipeline",
                 "StableDiffusion3Pipeline"):
        assert wants_bfloat16(name), name
    assert not wants_bfloat16("StableDiffusionXLPipeline") and not wants_bfloat16("PixArtSigmaPipeline")
