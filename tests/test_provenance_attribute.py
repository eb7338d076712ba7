"""Provenance in the request path: the file's embedded prompt describes it, a model its metadata names is
matched against the enrolled sources (agreement and conflict stated, the ranking untouched), and each
result lists every scored source's closest stored references. Every file is built here, at test time."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

from PIL import Image, PngImagePlugin
from sqlalchemy import select

import engine
from engine import Options
from engine.compare import match_source, model_stem, reference_file
from index.schema import Description, Image as ImageRow, Source
from tests.helpers import run_cli

ONE = Options(per_source=1, adaptive=False)


def with_texts(image_path: Path, texts: dict, out: Path) -> Path:
    """The same pixels as `image_path`, saved as a PNG carrying `texts` as tEXt chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    Image.open(image_path).convert("RGB").save(out, "PNG", pnginfo=info)
    return out


def claim_of(result) -> dict:
    """The model claim in a result's evidence, without the redraw from the recipe (tests/test_reproduce.py)."""
    return {k: result.evidence["provenance"][k] for k in ("claims", "enrolled", "by", "agrees")}


def a1111(prompt: str, model: str | None, model_hash: str | None = None) -> dict:
    settings = "Steps: 2, Sampler: DDIM, CFG scale: 7, Seed: 500, Size: 32x32"
    if model_hash:
        settings += f", Model hash: {model_hash}"
    if model:
        settings += f", Model: {model}"
    return {"parameters": f"{prompt}\nNegative prompt: blurry, lowres\n{settings}, Version: v1.10.1"}


def comfyui(prompt: str, checkpoint: str) -> dict:
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 500, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
                                                    "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                    "positive": ["6", 0], "negative": ["7", 0],
                                                    "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }
    return {"prompt": json.dumps(graph), "workflow": json.dumps({"nodes": [], "links": []})}


def test_a1111_png_is_described_by_its_metadata_and_its_model_claim_is_stated(store_dir, originals, models,
                                                                             tmp_path, capsys):
    query = originals[0]
    true = query["source"]
    others = [n for n in models["pipelines"] if n != true]
    claiming = with_texts(query["image"], a1111(query["prompt"], true), tmp_path / "a1111.png")
    with engine.open(store_dir) as ws:  # no captioner, and no prompt given
        assert ws.captioner is None
        result = ws.attribute(claiming, options=ONE).results[0]
        assert (result.description_from, result.description) == ("metadata", query["prompt"])
        meta = result.provenance["metadata"]
        assert meta["tool"] == "automatic1111" and meta["model_name"] == true and meta["seed"] == 500
        predicted = result.predicted
        assert claim_of(result) == {"claims": true, "enrolled": true, "by": "name",
                                                 "agrees": predicted == true}
        assert result.unknown is None and result.verdict == "uncalibrated"  # no claim: no contradiction

        # The same pixels claiming the predicted source agree; claiming another enrolled source conflict.
        # Neither moves the ranking: provenance is stated beside it, never over it.
        wrong = next(n for n in others if n != predicted)
        for name, agrees in ((predicted, True), (wrong, False)):
            path = with_texts(query["image"], a1111(query["prompt"], f"{name}.safetensors"), tmp_path / f"{name}.png")
            other = ws.attribute(path, options=ONE).results[0]
            assert claim_of(other) == {"claims": f"{name}.safetensors", "enrolled": name, "by": "name",
                                                    "agrees": agrees}
            assert other.predicted == predicted and other.generated == 0
            assert [(s.source, round(s.score, 6)) for s in other.scores] == \
                [(s.source, round(s.score, 6)) for s in result.scores]

        # A model nobody enrolled: claimed, matched to nothing, neither agreeing nor conflicting.
        path = with_texts(query["image"], a1111(query["prompt"], "v1-5-pruned-emaonly", "6ce0161689"),
                          tmp_path / "foreign.png")
        foreign = ws.attribute(path, options=ONE).results[0]
        assert claim_of(foreign) == {"claims": "v1-5-pruned-emaonly", "enrolled": None, "by": None,
                                                  "agrees": None}
        # Metadata without a model: described by it, no claim in the evidence.
        path = with_texts(query["image"], a1111(query["prompt"], None), tmp_path / "no-model.png")
        plain = ws.attribute(path, options=ONE).results[0]
        assert plain.description_from == "metadata" and "provenance" not in plain.evidence

        # The caller's prompt still comes first.
        prompted = ws.attribute(claiming, originals[1]["prompt"], ONE).results[0]
        assert (prompted.description_from, prompted.description) == ("prompt", originals[1]["prompt"])
        # A decoded image has no file to read: the key is there, empty, and says why.
        decoded = ws.attribute(Image.open(claiming), query["prompt"], ONE).results[0]
        assert decoded.provenance["metadata"] is None and "decoded image" in decoded.provenance["notes"][0]

    # The CLI's JSON carries the same, for a file given with no --prompt.
    capsys.readouterr()
    assert run_cli("attribute", claiming, "--store", store_dir, "--json", "--quiet", "--per-source", 1) == 0
    data = json.loads(capsys.readouterr().out)["results"][0]
    assert data["description_from"] == "metadata" and data["provenance"]["metadata"]["tool"] == "automatic1111"
    assert data["evidence"]["provenance"]["enrolled"] == true and data["unknown"] is None
    assert json.loads(json.dumps(data)) == data


def test_comfyui_png_is_described_by_its_prompt_graph(store_dir, originals, tmp_path):
    query = next(o for o in originals if o["source"] == "tiny-sd-euler")
    path = with_texts(query["image"], comfyui(query["prompt"], "tiny/tiny-sd-euler.safetensors"),
                      tmp_path / "comfy.png")
    with engine.open(store_dir) as ws:
        result = ws.attribute(path, options=ONE).results[0]
    assert (result.description_from, result.description) == ("metadata", query["prompt"])
    assert result.provenance["metadata"]["tool"] == "comfyui"
    # "tiny-sd-euler" is inside "tiny-sd-euler-a" too: the exact name wins
    claim = result.evidence["provenance"]
    assert claim["enrolled"] == "tiny-sd-euler" and claim["by"] == "name"
    assert claim["agrees"] == (result.predicted == "tiny-sd-euler")


def test_an_embedded_prompt_with_a_lone_surrogate_is_read_with_a_replacement_character(store_dir, originals, tmp_path,
                                                                                   capsys):
    """JSON's `\\ud800` escape in a ComfyUI graph: `resynth attribute` failed with a traceback
    (UnicodeEncodeError) where the description was hashed; the character is now U+FFFD."""
    query = originals[0]
    path = with_texts(query["image"], comfyui("a man \ud800 in a hat", "x.safetensors"), tmp_path / "lone.png")
    assert "\\ud800" in Image.open(path).text["prompt"]  # the file holds the escape, as a JSON writer puts it
    with engine.open(store_dir) as ws:
        result = ws.attribute(path, options=ONE).results[0]
    assert (result.description_from, result.description) == ("metadata", "a man \ufffd in a hat")
    capsys.readouterr()
    assert run_cli("attribute", path, "--store", store_dir, "--json", "--quiet", "--per-source", 1) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["description"] == "a man \ufffd in a hat"


def test_closest_lists_each_sources_nearest_resyntheses_of_the_description(store_dir, originals, models):
    query = originals[3]
    options = Options(per_source=3, adaptive=False, mode="resynthesis")
    with engine.open(store_dir) as ws:
        result = ws.attribute(query["image"], query["prompt"], options).results[0]
        assert set(result.closest) == {s.source for s in result.scores} == set(models["pipelines"])
        scores = {s.source: s.score for s in result.scores}
        store = ws.store
        for name, near in result.closest.items():
            assert len(near) == 3
            sims = [n["similarity"] for n in near]
            assert sims == sorted(sims, reverse=True)
            assert max(sims) >= scores[name] - 1e-5  # no aggregate exceeds the best reference
            with store.session() as s:
                rows = s.execute(select(ImageRow.role, Source.name, Description.text)
                                 .join(Source, ImageRow.source_id == Source.id)
                                 .join(Description, ImageRow.description_id == Description.id)
                                 .where(ImageRow.id.in_([n["image_id"] for n in near]))).all()
            assert sorted(rows) == [("resynthesis", name, query["prompt"])] * 3
            for n in near:
                path = reference_file(store, n["image_id"])
                assert path is not None and path.is_file() and Image.open(path).size
        # an id names a stored image or nothing: no path from the caller
        for bad in (0, -1, True, "1", 10 ** 12, 2 ** 70, None):
            assert reference_file(store, bad) is None
        # the dict is JSON as it stands
        assert json.loads(json.dumps(result.to_dict()))["closest"] == result.closest


def test_model_names_and_hashes_match_enrolled_sources(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not really weights" * 100)
    autov2 = hashlib.sha256(weights.read_bytes()).hexdigest()[:10]
    sources = [SimpleNamespace(name="sdxl-base", kind="diffusers", fingerprint="ab" * 32, path=None),
               SimpleNamespace(name="SD-Euler", kind="diffusers", fingerprint="cd" * 32, path=None),
               SimpleNamespace(name="sd-euler-a", kind="diffusers", fingerprint="ef" * 32, path=None),
               SimpleNamespace(name="my-checkpoint", kind="single-file", fingerprint="12" * 32, path=str(weights))]
    assert model_stem("C:\\models\\SDXL\\Base.SafeTensors") == "base"
    assert match_source(sources, "sd-euler", None) == ("SD-Euler", "name")  # case-insensitive, equal first
    assert match_source(sources, "models/sd-euler-a.safetensors", None) == ("sd-euler-a", "name")
    assert match_source(sources, "sdxl-base-1.0-fp16", None) == ("sdxl-base", "name")  # the source inside the model
    assert match_source(sources, "checkpoint", None) == ("my-checkpoint", "name")  # the model inside the source
    assert match_source(sources, "sd", None) == (None, None)  # too short to name one
    assert match_source(sources, "renamed", autov2) == ("my-checkpoint", "hash")  # A1111's short file hash
    assert match_source(sources, None, autov2.upper()) == ("my-checkpoint", "hash")
    assert match_source(sources, None, "cdcdcdcdcd") == ("SD-Euler", "hash")  # a fingerprint prefix
    assert match_source(sources, "other", "0000000000") == (None, None)
    assert match_source(sources, None, "abab") == (None, None)  # too short to be a hash
