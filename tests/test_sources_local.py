"""Local source kinds beyond a diffusers folder: single-file checkpoints and LoRA adapters on a base.

Each must generate what its folder form generates: the single file exactly (same weights, other layout),
a LoRA source like the same adapters fused into a folder (float rounding only)."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import sources
from engine.errors import UserError
from engine.generate import DiffusersGenerator, GenerationParams
from engine.sources.lora import BASES, Lora, base_loads, write_fused_folder, write_random_lora
from engine.sources.single_file import SingleFile, export_single_file

HAVE_PEFT = importlib.util.find_spec("peft") is not None  # diffusers' LoRA backend (a dependency of LoRA sources)
needs_peft = pytest.mark.skipif(not HAVE_PEFT, reason="LoRA sources need peft (pip install peft)")
PROMPT = "portrait of an old man with a beard"
SEEDS = [7, 8]


@pytest.fixture(scope="module", autouse=True)
def kinds():
    """Registered here until engine.sources._builtin lists them (a no-op once it does)."""
    sources.get("diffusers")  # the built-in kinds first, so these do not shadow them
    known = {k.name for k in sources.kinds()}
    added = [kind for kind in (SingleFile(), Lora()) if kind.name not in known]
    for kind in added:
        sources.register(kind)
    yield
    for kind in added:  # later test modules see the registry as _builtin made it
        sources._KINDS.pop(kind.name, None)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def workspace(models, root: Path):
    return engine.init(root, clip_config=models["clip_config"], clip_checkpoint=models["clip_checkpoint"])


@pytest.fixture(scope="module")
def local(models, tmp_path_factory) -> dict:
    """A single-file export of tiny-sd-ddim, its config-only folder, and two random LoRAs on it."""
    root = tmp_path_factory.mktemp("local")
    base = models["pipelines"]["tiny-sd-ddim"]
    config = root / "config"  # configs, tokenizer, scheduler: no weights, so they can only come from the file
    shutil.copytree(base, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    made = {"base": base, "config": config, "root": root,
            "file": export_single_file(base, root / "tiny-sd.safetensors")}
    if HAVE_PEFT:
        made["a"] = write_random_lora(base, root / "a.safetensors", seed=1, rank=4)
        made["b"] = write_random_lora(base, root / "b.safetensors", seed=2, rank=8)
    return made


def test_single_file_generates_what_its_folder_does(models, local, tmp_path):
    folder = DiffusersGenerator("folder", local["base"], GenerationParams(steps=2)).generate(PROMPT, SEEDS)
    with workspace(models, tmp_path / "store") as ws:
        info = ws.add_source("one-file", kind="single-file", path=local["file"], config=local["config"], steps=2)
        assert info["kind"] == "single-file" and info["path"] == str(local["file"])
        single = ws.generator("one-file").generate(PROMPT, SEEDS)
        # the same recipe again is a twin; another recipe is another source
        with pytest.raises(UserError, match="already uses this checkpoint"):
            ws.add_source("again", kind="single-file", path=local["file"], config=local["config"], steps=2)
        other = ws.add_source("three-steps", kind="single-file", path=local["file"], config=local["config"], steps=3)
        assert other["fingerprint"] != info["fingerprint"]
        (stored,) = [s for s in ws.sources() if s.name == "one-file"]
        assert sources.kind_of(stored).params_hash(stored) == GenerationParams(steps=2).hash()
    assert np.array_equal(pixels(single), pixels(folder))  # same weights, same seeds: the same pixels


def test_single_file_fingerprint_and_refusals(models, local, tmp_path):
    import torch
    from safetensors.torch import save_file

    kind = SingleFile()
    first = kind.prepare("x", local["file"], config=local["config"], steps=2).fingerprint
    changed = tmp_path / "changed.safetensors"
    data = bytearray(local["file"].read_bytes())
    data[-1] ^= 1  # one bit of the last tensor: same size, same header, other content
    changed.write_bytes(bytes(data))
    assert kind.prepare("x", changed, config=local["config"], steps=2).fingerprint != first
    with pytest.raises(UserError, match="needs --config"):
        kind.prepare("x", local["file"])
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"PK\x03\x04")
    with pytest.raises(UserError, match="must be a .safetensors file"):
        kind.prepare("x", pickled, config=local["config"])
    with pytest.raises(UserError, match="not a single-file checkpoint"):  # a diffusers component file
        kind.prepare("x", next(local["base"].glob("unet/*.safetensors")), config=local["config"])
    with pytest.raises(UserError, match="model_index.json"):
        kind.prepare("x", local["file"], config=tmp_path)
    with pytest.raises(UserError, match=r"is a folder, not a \.safetensors file \(a diffusers folder is its own "
                                         r"source: resynth source add NAME DIR, without --config\)"):
        kind.prepare("x", local["base"], config=local["config"])  # it said "checkpoint file not found"
    shouting = tmp_path / "MODEL.SAFETENSORS"
    shutil.copy(local["file"], shouting)
    with pytest.raises(UserError, match=r"MODEL.SAFETENSORS: rename it to end in .safetensors, in lower case"):
        kind.prepare("x", shouting, config=local["config"])  # it said "convert them to safetensors first"
    with pytest.raises(UserError, match="does not fit tiny-sd-euler-a: its unet is 32 wide"):  # another family
        kind.prepare("x", local["file"], config=models["pipelines"]["tiny-sd-euler-a"])
    sd3 = tmp_path / "sd3.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.ones(96, 32)}, str(sd3))
    with pytest.raises(UserError, match="SD3"):
        kind.prepare("x", sd3, config=local["config"])
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(local["file"].read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated"):
        kind.prepare("x", truncated, config=local["config"])


@needs_peft
def test_lora_sources_generate_like_fused_folders_sharing_one_base(models, local, tmp_path):
    a, b, base = local["a"], local["b"], local["base"]
    fused_a = write_fused_folder(base, f"{a}:0.7", tmp_path / "fused-a")
    fused_ab = write_fused_folder(base, [f"{a}:0.7", str(b)], tmp_path / "fused-ab")
    params = GenerationParams(steps=2)
    expect_a = pixels(DiffusersGenerator("fa", fused_a, params).generate(PROMPT, SEEDS))
    expect_ab = pixels(DiffusersGenerator("fab", fused_ab, params).generate(PROMPT, SEEDS))
    plain = pixels(DiffusersGenerator("base", base, params).generate(PROMPT, SEEDS))
    BASES.clear()  # no idle base left by another test: this one counts its own loads
    loads = base_loads(base)
    with workspace(models, tmp_path / "store") as ws:
        ws.add_source("lora-a", base, kind="lora", lora=f"{a}:0.7", steps=2)
        info = ws.add_source("lora-ab", base, kind="lora", lora=f"{b},{a}:0.7", steps=2)  # order: any
        with pytest.raises(UserError, match="already uses this base with the same adapters"):
            ws.add_source("lora-ba", base, kind="lora", lora=[f"{a}:0.7", f"{b}:1"], steps=2)
        assert ws.add_source("lora-a-half", base, kind="lora", lora=f"{a}:0.5", steps=2)["fingerprint"] \
            not in (info["fingerprint"],)
        got_a = pixels(ws.generator("lora-a").generate(PROMPT, SEEDS))
        got_ab = pixels(ws.generator("lora-ab").generate(PROMPT, SEEDS))
        again_a = pixels(ws.generator("lora-a").generate(PROMPT, SEEDS))  # switched back, base not reloaded
        assert base_loads(base) == loads + 1
        stored = {s.name: s for s in ws.sources()}
        assert sources.kind_of(stored["lora-a"]).params_hash(stored["lora-a"]) != \
            sources.kind_of(stored["lora-a-half"]).params_hash(stored["lora-a-half"])
    assert np.abs(got_a - expect_a).max() <= 2 and np.abs(got_ab - expect_ab).max() <= 2
    assert np.array_equal(got_a, again_a)
    assert np.abs(got_a - plain).mean() > 1 and np.abs(got_ab - got_a).mean() > 1  # the adapters do something


@needs_peft
def test_lora_sources_attribute_end_to_end_and_refusals(models, local, tmp_path):
    """The engine's own path (plan, generate, store, score) with LoRA sources, and the declaration checks."""
    from engine.images import save_png_atomic
    from engine.options import Options

    a, b, base = local["a"], local["b"], local["base"]
    query = tmp_path / "query.png"
    save_png_atomic(DiffusersGenerator("fb", write_fused_folder(base, str(b), tmp_path / "fused-b"),
                                       GenerationParams(steps=2)).generate(PROMPT, [1000])[0], query)
    with workspace(models, tmp_path / "store") as ws:
        ws.add_source("lora-a", base, kind="lora", lora=str(a), steps=2)
        ws.add_source("lora-b", base, kind="lora", lora=str(b), steps=2)
        report = ws.attribute([query], prompt=PROMPT, options=Options(per_source=2, adaptive=False))
        (result,) = report.results
        assert {s.source for s in result.scores} == {"lora-a", "lora-b"} and not result.failed
        assert report.generated == 4 and result.predicted in {"lora-a", "lora-b"}
        # LoRAs of one base: combined mode (the default) compares only resyntheses of the query's description,
        # even with another description's resyntheses stored among its nearest neighbours
        ws.attribute([query], prompt=PROMPT + ", at night", options=Options(per_source=2, adaptive=False))
        combined = ws.attribute([query], prompt=PROMPT, options=Options(per_source=2, adaptive=False)).results[0]
        alone = ws.attribute([query], prompt=PROMPT, options=Options(mode="resynthesis", per_source=2,
                                                                     adaptive=False)).results[0]
        assert combined.evidence["mode"] == "resynthesis" and alone.evidence["mode"] == "resynthesis"
        assert [(s.source, s.score) for s in combined.scores] == [(s.source, s.score) for s in alone.scores]
        dataset = ws.attribute([query], prompt=PROMPT, options=Options(mode="dataset")).results[0]
        assert dataset.evidence["mode"] == "dataset"
        assert [(s.source, s.score) for s in dataset.scores] != [(s.source, s.score) for s in alone.scores]
        kind = Lora()
        with pytest.raises(UserError, match="needs --lora"):
            kind.prepare("x", base)
        with pytest.raises(UserError, match="holds no LoRA weights"):
            kind.prepare("x", base, lora=str(local["file"]))
        with pytest.raises(UserError, match="given twice"):
            kind.prepare("x", base, lora=f"{a}:0.5,{a}:0.5")
        with pytest.raises(UserError, match="LoRA file not found"):
            kind.prepare("x", base, lora=str(tmp_path / "missing.safetensors:0.5"))
        assert kind.prepare("x", base, lora=f"{a}:0.25").params["loras"][0]["scale"] == 0.25


def test_vision_language_captioner_describes_a_query_end_to_end(models, local, tmp_path, monkeypatch):
    """A tiny random LLaVA folder (AutoModelForImageTextToText + AutoProcessor) with an instruction describes
    a query that came without a prompt, through the workspace's describe step."""
    from engine.captioners import VisionLanguageCaptioner, is_vision_language, write_tiny_llava
    from engine.images import save_png_atomic
    from engine.options import Options

    folder = write_tiny_llava(tmp_path / "llava")
    assert is_vision_language(folder)
    query = tmp_path / "query.png"
    save_png_atomic(DiffusersGenerator("q", local["base"], GenerationParams(steps=2)).generate(PROMPT, [1000])[0],
                    query)
    captioner = VisionLanguageCaptioner(folder, device="cpu", instruction="Describe this image.", max_new_tokens=6)
    assert captioner.prompt().count("<image>") == 1 and "Describe this image." in captioner.prompt()
    from PIL import Image

    assert captioner.caption([Image.open(query)]) == captioner.caption([Image.open(query)])  # greedy
    # through the engine: a store whose captioner folder is the VLM, chosen by describe.make_captioner
    monkeypatch.setenv("RESYNTH_CAPTION_INSTRUCTION", "Describe this image.")
    expected = VisionLanguageCaptioner(folder, device="cpu", instruction="Describe this image.").caption(
        [Image.open(query)])[0]
    with engine.init(tmp_path / "store", clip_config=models["clip_config"], clip_checkpoint=models["clip_checkpoint"],
                     captioner=folder) as ws:
        ws.add_source("base", local["base"], steps=2)
        (result,) = ws.attribute([query], options=Options(per_source=1, adaptive=False)).results
    assert result.description_from == "caption" and result.description == expected and result.predicted == "base"
    # the instruction kept in the store (init --caption-instruction), which the environment overrides per run
    from tests.helpers import run_cli

    monkeypatch.delenv("RESYNTH_CAPTION_INSTRUCTION")
    assert run_cli("init", "--store", tmp_path / "s2", "--clip-config", models["clip_config"], "--clip-checkpoint",
                   models["clip_checkpoint"], "--captioner", folder, "--caption-instruction", "Name  the colours.",
                   "--quiet") == 0
    with engine.open(tmp_path / "s2") as ws:
        assert ws.store.config["caption_instruction"] == "Name the colours."
        assert ws.captioner.instruction == "Name the colours."
    monkeypatch.setenv("RESYNTH_CAPTION_INSTRUCTION", "Describe this image.")
    with engine.open(tmp_path / "s2") as ws:
        assert ws.captioner.instruction == "Describe this image."
    for captioner, why in ((models["captioner"], "applies to vision-language captioners"),  # BLIP: no instruction
                           (None, "needs --captioner"), (folder, "must not be empty")):
        with pytest.raises(UserError, match=why):
            engine.init(tmp_path / "s3", clip_config=models["clip_config"], clip_checkpoint=models["clip_checkpoint"],
                        captioner=captioner, caption_instruction="  " if why == "must not be empty" else "Say hi.")
    with pytest.raises(UserError, match="not an image-text-to-text"):
        VisionLanguageCaptioner(local["config"] / "unet")


@needs_peft
def test_cli_source_add_infers_the_local_kinds(models, local, tmp_path, capsys):
    """`source add` flags come from the kinds' params: a file with --config is a single file, a folder
    with --lora a LoRA source, a folder alone the default kind; `source list` shows their recipes."""
    import json

    from tests.helpers import run_cli

    store = tmp_path / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"]) == 0
    assert run_cli("source", "add", "one-file", local["file"], "--config", local["config"], "--steps", 2,
                   "--store", store) == 0
    assert run_cli("source", "add", "lora-ab", local["base"], "--lora", f"{local['a']}:0.7,{local['b']}",
                   "--steps", 2, "--store", store) == 0
    # the flag repeated names the same adapters as the comma form (in any order): the same source, refused as a twin
    assert run_cli("source", "add", "lora-ba", local["base"], "--lora", str(local["b"]), "--lora",
                   f"{local['a']}:0.7", "--steps", 2, "--store", store) == 2
    assert "'lora-ab'" in capsys.readouterr().err
    assert run_cli("source", "add", "base", local["base"], "--steps", 2, "--store", store) == 0
    assert run_cli("source", "add", "no-config", local["file"], "--store", store) == 2  # a file needs --config
    assert "single-file source with --config DIR" in capsys.readouterr().err
    # a LoRA file is no checkpoint: the hint names --lora on its base, with or without --config
    assert run_cli("source", "add", "a-lora", local["a"], "--store", store) == 2
    err = capsys.readouterr().err
    assert f"{local['a'].name} is a LoRA" in err and "--lora " in err and "single-file" not in err
    with pytest.raises(UserError, match=r"is a LoRA .* --lora "):
        SingleFile().prepare("x", local["a"], config=local["config"])
    assert run_cli("source", "add", "bad", local["base"], "--lora", f"{local['a']}:x", "--store", store) != 0
    err = capsys.readouterr().err  # the scale is named, not "LoRA file not found: FILE:x"
    assert "--lora FILE:SCALE: 'x' is not a number" in err and "not found" not in err and err.count("\n") == 1
    # a configs-only folder is no base: refused at `source add` (it used to fail at its first generation)
    assert run_cli("source", "add", "no-weights", local["config"], "--lora", local["a"], "--store", store) == 2
    assert "no weight files (*.safetensors, *.bin) in text_encoder, unet, vae:" in capsys.readouterr().err
    with engine.open(store) as ws:
        rows = {r["name"]: r for r in ws.list_sources()}
    assert {n: r["kind"] for n, r in rows.items()} == {"one-file": "single-file", "lora-ab": "lora",
                                                        "base": "diffusers"}
    assert [a["scale"] for a in rows["lora-ab"]["params"]["loras"]] and json.dumps(rows["lora-ab"]["params"])
    assert sources.get("lora").describe_recipe(rows["lora-ab"]["params"], rows["lora-ab"]["path"]).count("LoRA") == 1


@needs_peft
def test_changed_or_foreign_model_files_fail_their_source_only(models, local, tmp_path):
    """Weights saved over a source's folder after `source add` (a fine-tune) and a LoRA made for another base:
    each fails its own source in one line (never the request, never new images under the old fingerprint);
    a LyCORIS file is refused at `source add`; a source scored without its fresh resyntheses says so."""
    from engine.images import save_png_atomic
    from engine.options import Options
    from engine.sources.pipeline import Pipeline
    from safetensors.torch import save_file
    import torch

    base = local["base"]
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    foreign = write_random_lora(models["pipelines"]["tiny-sd-euler-a"], tmp_path / "foreign.safetensors", seed=3)
    nowhere = tmp_path / "flux-keys.safetensors"  # tensor names of a Flux transformer: no layer of an SD UNet
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 32),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(32, 4)}, str(nowhere))
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.ones(4, 4)}, str(loha))
    query = tmp_path / "query.png"
    save_png_atomic(DiffusersGenerator("q", base, GenerationParams(steps=2)).generate(PROMPT, [1000])[0], query)
    BASES.clear()  # bases earlier tests' generators still hold would not go idle here
    with workspace(models, tmp_path / "store") as ws:
        ws.add_source("copy", copy, steps=2)
        for name, file in (("foreign", foreign), ("nowhere", nowhere)):
            with pytest.raises(UserError, match="another base model"):  # refused at source add now ...
                ws.add_source(name, base, kind="lora", lora=str(file), steps=2)
            with pytest.MonkeyPatch.context() as older:  # ... as added by a version that did not check layers
                older.setattr("engine.sources.lora.check_adapter_fits", lambda *args: None)
                ws.add_source(name, base, kind="lora", lora=str(file), steps=2)
        with pytest.raises(UserError, match="LoHa/LoKr"):
            ws.add_source("loha", base, kind="lora", lora=str(loha), steps=2)
        first = ws.attribute([query], prompt=PROMPT, options=Options(per_source=1, adaptive=False)).results[0]
        assert [s.source for s in first.scores] == ["copy"] and not first.degraded
        assert "another base model" in first.failed["foreign"] and "matches no layer" in first.failed["nowhere"]
        assert all("\n" not in why for why in first.failed.values())
        # the failed LoRAs' base stays loaded, idle, for the next LoRA of that base, but it counts as a
        # pipeline: with room for one, making room for another source drops it
        assert BASES._idle is not None
        ws.max_loaded = 1
        ws.make_room_for(ws.generator("copy"))
        assert BASES._idle is None
        unet = next(copy.glob("unet/*.safetensors"))
        data = bytearray(unet.read_bytes())
        data[-1] ^= 1  # a fine-tune saved over the folder: same names, same sizes, other weights
        unet.write_bytes(bytes(data))
        # combined mode scores "copy" on its stored neighbours, and says that its fresh resyntheses are missing
        second = ws.attribute([query], prompt=PROMPT + ", at dusk", options=Options(per_source=1, adaptive=False))
        (result,) = second.results
        assert second.generated == 0 and [s.source for s in result.scores] == ["copy"]
        assert "changed since the source was added" in result.degraded["copy"]
        assert any(n.startswith("copy was scored without") for n in result.notes)
    # one recipe, one fingerprint, whichever type its numbers came in (Python 7 and the CLI's 7.0)
    kind = Pipeline()
    assert kind.prepare("x", base, guidance=7).fingerprint == kind.prepare("x", base, guidance=7.0).fingerprint
