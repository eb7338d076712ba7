"""Hostile and odd model files at `source add` and before a load: each case here was a traceback, a source
enrolled that could only fail (or make black images) at its first generation, or a change the fingerprint
missed. Nothing here generates: every refusal comes before anything loads."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.errors import SourceError, UserError
from engine.generate import _finite_pil, fingerprint_folder, load_pipeline, GenerationParams
from engine.sources.lora import Lora
from engine.sources.model_files import check_components
from engine.sources.pipeline import Pipeline
from engine.sources.single_file import SingleFile, file_sha256
from tests.helpers import run_cli

LORA_KEY = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"  # a layer of tiny-sd-ddim


class Payload:
    """Unpickled unsafely, it would create `marker`: the proof that no code of a model file ever runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _safetensors(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _hostile_headers(root: Path) -> list[Path]:
    b_key = LORA_KEY.replace("lora_A", "lora_B")
    return [
        _safetensors(root / "petabyte.safetensors", b"{}", length=1 << 50),  # was a MemoryError traceback
        _safetensors(root / "u64max.safetensors", b"{}", length=(1 << 64) - 1),  # was an OverflowError
        _safetensors(root / "nested.safetensors", b"[" * 100_000 + b"]" * 100_000),  # was a RecursionError
        _safetensors(root / "array.safetensors", b"[1, 2]"),  # was a TypeError
        _safetensors(root / "notjson.safetensors", b"\xff\xfe not json"),
        _safetensors(root / "dtype.safetensors", json.dumps({LORA_KEY: _entry("F99", [4, 4], 0, 64), b_key: _entry(
            "F32", [4, 4], 64, 128)}).encode(), b"\0" * 128),  # these three were enrolled as LoRAs
        _safetensors(root / "overlap.safetensors", json.dumps({LORA_KEY: _entry("F32", [4, 4], 0, 64), b_key: _entry(
            "F32", [4, 4], 0, 64)}).encode(), b"\0" * 64),
        _safetensors(root / "shape.safetensors", json.dumps({LORA_KEY: _entry("F32", [1 << 40, 1 << 40], 0, 64),
                                                             b_key: _entry("F32", [4, 4], 64, 128)}).encode(),
                     b"\0" * 128),
        _safetensors(root / "empty.safetensors", b"", length=0),
    ]


def test_hostile_safetensors_headers_are_one_line_in_every_kind(models, tmp_path, capsys):
    base = models["pipelines"]["tiny-sd-ddim"]
    for file in _hostile_headers(tmp_path):
        for kind, args, params in ((Pipeline(), (file,), {}), (SingleFile(), (file,), {"config": base}),
                                   (Lora(), (base,), {"lora": str(file)})):
            with pytest.raises(UserError, match="corrupt weight file"):
                kind.prepare("x", *args, **params)
    store = tmp_path / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"]) == 0
    capsys.readouterr()
    assert run_cli("source", "add", "x", tmp_path / "petabyte.safetensors", "--store", store) == 2
    err = capsys.readouterr().err
    assert err.startswith("resynth: error: corrupt weight file") and err.count("\n") == 1
    assert run_cli("source", "list", "--store", store, "--json") == 0
    assert json.loads(capsys.readouterr().out) == []  # nothing written for a refused source
    # one adapter file under two names (a downloaded copy) is one source: the second is refused as its twin
    adapter = tmp_path / "adapter.safetensors"
    save_file({LORA_KEY: torch.ones(4, 64), LORA_KEY.replace("lora_A", "lora_B"): torch.ones(64, 4)}, str(adapter))
    copy = shutil.copy(adapter, tmp_path / "renamed.safetensors")
    recipe = ("--steps", 2, "--guidance", 7, "--store", store)
    assert run_cli("source", "add", "one", base, "--lora", adapter, *recipe) == 0
    assert run_cli("source", "add", "two", base, "--lora", copy, *recipe) == 2
    assert "'one' already uses this base with the same adapters" in capsys.readouterr().err


class Callback:
    """A class torch.load(weights_only=True) refuses, as a Lightning checkpoint's callbacks."""


def test_pickled_payloads_are_refused_unrun(models, tmp_path):
    marker = tmp_path / "payload-ran"
    base = models["pipelines"]["tiny-sd-ddim"]
    folder = tmp_path / "bin-weights"
    shutil.copytree(base, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    weights.unlink()
    torch.save({**state, "x": Payload(marker)}, folder / "unet" / "diffusion_pytorch_model.bin")
    for attempt in (lambda: Pipeline().prepare("x", folder), lambda: load_pipeline(folder, GenerationParams(), "cpu")):
        with pytest.raises(UserError, match="pickle that would call posix.mkdir"):
            attempt()
    # real pickles pass: a state dict of fp16/bf16 tensors; a pickle diffusers never loads (a whole repository's
    # own .ckpt beside its folders, a training run's checkpoint-500/) is not scanned, whatever it names
    torch.save({k: v.to(torch.bfloat16 if i % 2 else torch.float16) for i, (k, v) in enumerate(state.items())},
               folder / "unet" / "diffusion_pytorch_model.bin")
    torch.save({"state_dict": state, "callbacks": {"ModelCheckpoint": Callback()}}, folder / "v1-5-pruned.ckpt")
    (folder / "checkpoint-500").mkdir()
    torch.save({"scheduler": Callback()}, folder / "checkpoint-500" / "scheduler.bin")
    Pipeline().prepare("x", folder)
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": Payload(marker)}, checkpoint)
    with pytest.raises(UserError, match="pickled checkpoint: loading one can run code"):  # not "use --config"
        Pipeline().prepare("x", checkpoint)
    assert not marker.exists()


def _edited(base: Path, root: Path, name: str, **components) -> Path:
    folder = root / name
    shutil.copytree(base, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, **components}))
    return folder


def test_components_that_need_code_or_leave_the_folder_or_cannot_work_are_refused_at_source_add(models, tmp_path):
    """diffusers itself would refuse each at the first generation (nothing ran even then): now `source add` does."""
    base = models["pipelines"]["tiny-sd-ddim"]
    custom = _edited(base, tmp_path, "custom", unet=["my_unet", "MyUNet"])
    (custom / "unet" / "my_unet.py").write_text(f"import os\nos.mkdir({str(tmp_path / 'ran')!r})\n")
    cases = {
        custom: "custom code shipped in the folder",
        _edited(base, tmp_path, "os", unet=["os", "system"]): "names a library diffusers does not load",
        _edited(base, tmp_path, "auto", text_encoder=["transformers", "AutoModel"]): "an Auto class",
        _edited(base, tmp_path, "dotdot", **{"../unet": ["diffusers", "UNet2DConditionModel"]}): "not a folder name",
    }
    # a tokenizer folder of settings alone: transformers builds a 2-token tokenizer that ignores every prompt
    settings = _edited(base, tmp_path, "settings-only")
    (settings / "tokenizer" / "tokenizer.json").unlink()
    cases[settings] = "tokenizer holds no vocabulary file"
    listed = _edited(base, tmp_path, "listed")  # was a traceback as a single file's --config folder
    (listed / "unet" / "config.json").write_text("[1, 2]")
    cases[listed] = "malformed unet/config.json"
    eager = _edited(base, tmp_path, "eager")  # a scheduler that would allocate arrays of 10**12 at each load
    config = json.loads((eager / "scheduler" / "scheduler_config.json").read_text())
    (eager / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "num_train_timesteps": 10**12}))
    cases[eager] = "num_train_timesteps 1000000000000 is not a count"
    for folder, why in cases.items():
        with pytest.raises(UserError, match=why):
            Pipeline().prepare("x", folder)
    assert not (tmp_path / "ran").exists()
    # what real folders name passes: diffusers' pipeline modules (imported lazily, as kolors) and renamed classes
    check_components(tmp_path, {"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
                                "text_encoder": ["kolors", "ChatGLMModel"],
                                "feature_extractor": ["transformers", "CLIPFeatureExtractor"]})


def test_weight_names_that_are_no_files_and_linked_components(models, tmp_path):
    base = models["pipelines"]["tiny-sd-ddim"]
    piped = tmp_path / "fifo"
    shutil.copytree(base, piped)
    weights = piped / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    os.mkfifo(weights)  # enrolled before: the fingerprint skipped it and "weights present" counted it
    with pytest.raises(UserError, match="not a regular file"):
        Pipeline().prepare("x", piped)
    shutil.rmtree(piped / "unet")
    (piped / "unet" / "diffusion_pytorch_model.safetensors").mkdir(parents=True)  # a folder posing as weights
    shutil.copy(base / "unet" / "config.json", piped / "unet")
    with pytest.raises(UserError, match="no weight files"):
        Pipeline().prepare("x", piped)
    # a component folder linked from elsewhere is part of the model: its target's weights count
    linked = tmp_path / "linked"
    shutil.copytree(base, linked, ignore=shutil.ignore_patterns("unet"))
    (linked / "unet").symlink_to(base / "unet")
    first = Pipeline().prepare("x", linked).fingerprint
    assert first == Pipeline().prepare("x", base).fingerprint  # the same files, linked or not
    # a source added before linked folders counted (its fingerprint without them) is not "changed" now
    legacy = fingerprint_folder(linked, linked=False)
    assert legacy != fingerprint_folder(linked)
    added = SimpleNamespace(name="x", path=str(linked), params_json=json.dumps(GenerationParams().__dict__))
    for stored, ok in ((Pipeline().current_fingerprint(added, linked=False, whole=False), True), ("0" * 64, False)):
        generator = Pipeline().load(SimpleNamespace(**vars(added), fingerprint=stored), "cpu")
        if ok:
            generator.check_unchanged()
        else:
            with pytest.raises(SourceError, match="changed since the source was added"):
                generator.check_unchanged()
    (linked / "unet").unlink()
    (linked / "unet").symlink_to(models["pipelines"]["tiny-sd-euler-a"] / "unet")  # another model's UNet
    assert Pipeline().prepare("x", linked).fingerprint != first  # was equal: links were not followed
    (linked / "loop").symlink_to(linked)  # a link loop ends
    (linked / "everything").symlink_to("/")  # lists /'s own entries: never walks the disk
    assert fingerprint_folder(linked) == fingerprint_folder(linked)
    (linked / "tokenizer" / "vocab.json").symlink_to("/dev/zero")  # transformers would read it forever
    with pytest.raises(UserError, match="vocab.json is not a regular file"):
        Pipeline().prepare("x", linked)


def test_adapters_with_nan_or_rank_0_are_refused_and_nan_pixels_are_a_source_failure(models, tmp_path):
    base = models["pipelines"]["tiny-sd-ddim"]
    b_key = LORA_KEY.replace("lora_A", "lora_B")
    nan = torch.ones(32, 4)
    nan[0, 0] = float("nan")
    save_file({LORA_KEY: torch.ones(4, 32), b_key: nan}, str(tmp_path / "nan.safetensors"))
    save_file({LORA_KEY: torch.ones(0, 32), b_key: torch.ones(32, 0)}, str(tmp_path / "rank0.safetensors"))
    with pytest.raises(UserError, match="NaN or infinite"):
        Lora().prepare("x", base, lora=str(tmp_path / "nan.safetensors"))
    with pytest.raises(UserError, match="rank 0"):
        Lora().prepare("x", base, lora=str(tmp_path / "rank0.safetensors"))
    # an absurd alpha (1e30) passes every file check and overflows only when generating: black images before
    pixels = np.full((1, 8, 8, 3), 0.5, dtype=np.float32)
    assert np.asarray(_finite_pil("x", pixels)[0]).max() == 128  # diffusers' own conversion, as output_type "pil"
    pixels[0, 0, 0, 0] = np.nan
    with pytest.raises(SourceError, match="NaN or infinite pixels"):
        _finite_pil("x", pixels)


def test_an_edit_in_place_with_the_old_mtime_set_back_is_seen(tmp_path):
    """The whole-file hash cache (single files, LoRAs) was keyed by size, mtime and inode: in a long-running
    process an edit that kept the size and restored the mtime went unseen by the changed-file check."""
    file = tmp_path / "model.safetensors"
    file.write_bytes(os.urandom(1 << 16))
    before, stat = file_sha256(file), file.stat()
    with open(file, "r+b") as handle:
        handle.seek(1 << 15)
        handle.write(b"\0" * 16)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file.stat().st_mtime_ns == stat.st_mtime_ns and file_sha256(file) != before


def test_an_edit_in_the_middle_of_a_weight_file_is_seen_and_older_sources_still_load(models, tmp_path):
    """`source add` recorded a weight file's first and last MiB: a LoRA fused into a multi-MiB UNet and saved over
    it at the same size (same header, same ends) was not "changed", so the old fingerprint's cached images would be
    served as the new weights'. Whole weights are recorded now; a source recorded the old way still loads."""
    folder = tmp_path / "model"
    shutil.copytree(models["pipelines"]["tiny-sd-ddim"], folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["zz.pad"] = torch.zeros(1 << 20)  # 4 MiB at the end: the UNet's own tensors lie past the first MiB
    save_file(tensors, weights)
    added = SimpleNamespace(name="x", path=str(folder), params_json=json.dumps(GenerationParams().__dict__))
    recipe = Pipeline().prepare("x", folder)
    stored, old_form = recipe.fingerprint, Pipeline().current_fingerprint(added, whole=False)
    assert stored == Pipeline().current_fingerprint(added) != old_form
    assert old_form in recipe.older  # the same folder added again beside a source recorded the old way: a twin
    kept = Pipeline().load(SimpleNamespace(**vars(added), fingerprint=stored), "cpu")
    kept.check_unchanged()  # passes, and is remembered by the files' stat: a reload costs no hashing
    with open(weights, "r+b") as handle:  # a weight in the middle, changed in place
        handle.seek(weights.stat().st_size // 2)
        handle.write(b"\x7f" * 8)
    with pytest.raises(SourceError, match="changed since the source was added"):
        kept.check_unchanged()  # the write changed its ctime: checked again, in full
    assert Pipeline().current_fingerprint(added, whole=False) == old_form  # the old record cannot see it
    for fingerprint, ok in ((stored, False), (old_form, True)):
        generator = Pipeline().load(SimpleNamespace(**vars(added), fingerprint=fingerprint), "cpu")
        if ok:
            generator.check_unchanged()
        else:
            with pytest.raises(SourceError, match="changed since the source was added"):
                generator.check_unchanged()


def _attention_lora(base: Path, rank: int = 4) -> dict:
    """A diffusers-format LoRA on every attention projection of a base's UNet, shaped from its header alone."""
    from engine.sources.single_file import safetensors_header

    header = safetensors_header(next((base / "unet").glob("*.safetensors")))
    lora = {}
    for key, entry in header.items():
        if key.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")):
            out, inp = entry["shape"]
            lora[f"unet.{key[:-len('.weight')]}.lora_A.weight"] = torch.randn(rank, inp)
            lora[f"unet.{key[:-len('.weight')]}.lora_B.weight"] = torch.randn(out, rank)
    return lora


def _kohya(lora: dict) -> dict:
    """The same adapter under kohya's names, with its `.alpha` tensors and a text-encoder part."""
    kohya = {}
    for key, tensor in lora.items():
        module, factor = key.removeprefix("unet.").split(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(4.0)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        name = f"lora_te_text_model_encoder_layers_0_self_attn_{proj}"
        kohya |= {f"{name}.lora_down.weight": torch.randn(4, 32), f"{name}.lora_up.weight": torch.randn(32, 4),
                  f"{name}.alpha": torch.tensor(4.0)}
    return kohya


def test_lora_files_in_the_wild_are_enrolled_whole_or_refused(models, tmp_path):
    """diffusers loads a LoRA whose tensors match its base only in part and drops the rest without a word (an
    SDXL LoRA's second text encoder on SD 1.x, layers the base lacks, a DoRA's magnitudes), and loads a file of
    foreign or unprefixed names as nothing: each was enrolled as a generator that was only part of itself, or
    none of it. Now every tensor must land on a layer of the base, at its shape, or `source add` says which."""
    base, xl = models["pipelines"]["tiny-sd-ddim"], models["pipelines"]["tiny-sdxl-euler"]
    lora = _attention_lora(base)
    kohya = _kohya(lora)
    te2 = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_"
    missing = "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_"
    first = next(k for k in lora if k.endswith("lora_A.weight"))
    cases = {
        "diffusers": (lora, None),
        "kohya": (kohya, None),  # A1111/kohya names and alphas, UNet and text encoder: loaded whole
        "other-base": (_attention_lora(xl), r"64 of 64 LoRA tensors do not fit the layers of tiny-sd-ddim"),
        "second-encoder": (lora | {te2 + "A.weight": torch.ones(4, 32), te2 + "B.weight": torch.ones(32, 4)},
                           r"2 of 66 LoRA tensors match no layer of tiny-sd-ddim \(e.g. text_encoder_2\."),
        "missing-layer": (lora | {missing + "A.weight": torch.ones(4, 64), missing + "B.weight": torch.ones(64, 4)},
                          r"2 of 66 .*unet\.down_blocks\.7\..*it would load only in part"),
        "kohya-missing": (kohya | {"lora_unet_down_blocks_5_attentions_0_proj_in.lora_down.weight": torch.ones(4, 64),
                                   "lora_unet_down_blocks_5_attentions_0_proj_in.lora_up.weight": torch.ones(64, 4)},
                          r"2 of 74 .*unet\.down_blocks\.5\.attentions\.0\.proj_in"),
        "vae": (lora | {"vae.decoder.conv_in.lora_A.weight": torch.ones(4, 4, 3, 3),
                        "vae.decoder.conv_in.lora_B.weight": torch.ones(32, 4, 1, 1)}, r"e\.g\. vae\.decoder"),
        "unprefixed": ({k.removeprefix("unet."): v for k, v in lora.items()}, r"64 of 64 .* match no layer"),
        "dora": (kohya | {"lora_unet_down_blocks_1_attentions_0_proj_in.dora_scale": torch.ones(1, 64)},
                 r"is a DoRA .* diffusers drops"),
        "uneven-rank": (lora | {first: torch.randn(8, lora[first].shape[1])}, r"different ranks .* a broken adapter"),
        "untrained": ({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in lora.items()},  # the base, renamed
                      r"untrained.safetensors changes nothing: its lora_B/up factors are all zeros"),
        "alpha-0": ({k: torch.tensor(0.0) if k.endswith(".alpha") else v for k, v in kohya.items()},
                    r"changes nothing: its alphas are all zeros"),
        "one-factor": ({k: v for k, v in lora.items() if k != first},  # was enrolled without that layer
                       r"1 layer has only one of its two factors \(e\.g\. unet\..*a broken adapter"),
        "loha": ({"lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.ones(4, 4)}, r"LyCORIS"),
        "oft": ({"lora_unet_down_blocks_1_attentions_0_proj_in.oft_blocks": torch.ones(4, 4, 4)}, r"LyCORIS"),
        "empty": ({}, r"holds no tensors"),
        "alpha-named": (lora | {first.replace("lora_A.weight", "alpha"): torch.tensor(4.0)},
                        r"has no 'lora' in its name, and diffusers loads no such file"),
    }
    for name, (tensors, refusal) in cases.items():
        file = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(file))
        if refusal is None:
            assert Lora().prepare(name, base, lora=str(file)).params["loras"][0]["file"] == str(file)
            continue
        with pytest.raises(UserError, match=refusal) as caught:
            Lora().prepare(name, base, lora=str(file))
        assert "\n" not in str(caught.value), name
    # SDXL kohya files name UNet blocks as the original code did (input_blocks.N.1): mapped by the base UNet's
    # layout, which diffusers reads by attribute (a plain dict refused every one of them)
    sgm = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_"
    te = "lora_te2_text_model_encoder_layers_0_self_attn_"
    sdxl = {f"{sgm}{p}.lora_down.weight": torch.randn(4, 16) for p in ("to_q", "to_k", "to_v", "to_out_0")}
    sdxl |= {f"{sgm}{p}.lora_up.weight": torch.randn(16, 4) for p in ("to_q", "to_k", "to_v", "to_out_0")}
    sdxl |= {f"{te}{p}.lora_{f}.weight": torch.randn(*((4, 32) if f == "down" else (32, 4)))
             for p in ("q_proj", "k_proj", "v_proj", "out_proj") for f in ("down", "up")}
    save_file(sdxl, str(tmp_path / "sdxl-kohya.safetensors"))
    Lora().prepare("sdxl-kohya", xl, lora=str(tmp_path / "sdxl-kohya.safetensors"))
    with pytest.raises(UserError, match="match no layer of tiny-sd-ddim"):
        Lora().prepare("sdxl-kohya", base, lora=str(tmp_path / "sdxl-kohya.safetensors"))
    (tmp_path / "zero.safetensors").write_bytes(b"")
    diffusers_file = (tmp_path / "diffusers.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(diffusers_file[:len(diffusers_file) // 2])
    for name, refusal in (("zero", "bad header length"), ("cut", "truncated")):
        with pytest.raises(UserError, match=refusal):
            Lora().prepare(name, base, lora=str(tmp_path / f"{name}.safetensors"))
    comma = tmp_path / "style, v2.safetensors"  # it said only "LoRA file not found: .../style"
    shutil.copy(tmp_path / "diffusers.safetensors", comma)
    with pytest.raises(UserError, match=r"LoRA file not found: .*/style \(--lora splits at commas: rename a file"):
        Lora().prepare("comma", base, lora=str(comma))
    with pytest.raises(UserError, match="scale of .* is 0, at which it changes nothing"):
        Lora().prepare("zero-scale", base, lora=f"{tmp_path / 'diffusers.safetensors'}:0")
    negative = Lora().prepare("negative", base, lora=f"{tmp_path / 'kohya.safetensors'}:-1")  # a slider, reversed
    assert negative.params["loras"][0]["scale"] == -1 and negative.warning is None
    assert "LoRA scale 40 of kohya.safetensors is far beyond" in Lora().prepare(
        "far", base, lora=f"{tmp_path / 'kohya.safetensors'}:40").warning


def test_a_lora_loads_with_the_alpha_its_file_records(models, tmp_path):
    """diffusers saves a LoRA's own config (rank, lora_alpha) in the file's `lora_adapter_metadata`; loaded from
    a dict of its tensors the alpha was dropped, so an adapter trained at alpha 1, rank 4 (scale 0.25) generated
    at 4 times its strength, without a word. Its source must load it from the file, as the fused reference does."""
    import peft

    from engine.sources.lora import LoraGenerator, write_random_lora

    base = models["pipelines"]["tiny-sd-ddim"]
    file = write_random_lora(base, tmp_path / "alpha.safetensors", seed=5, rank=4, alpha=1)
    recipe = Lora().prepare("alpha", base, lora=str(file), steps=2)
    generator = LoraGenerator("alpha", Path(recipe.path), GenerationParams(steps=2), recipe.params["loras"], "cpu")
    try:
        layers = [m for m in generator.load().unet.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        assert layers and {s for m in layers for s in m.scaling.values()} == {0.25}
    finally:
        generator.unload()
    # a LoRA with a tensor for a layer the base lacks, in a source added before `source add` checked them: its
    # first load says so, where diffusers drops the tensor and the source generated as part of its adapter
    partial = tmp_path / "partial.safetensors"
    missing = "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_"
    save_file(load_file(str(file)) | {missing + "A.weight": torch.ones(4, 64), missing + "B.weight": torch.ones(64, 4)},
              str(partial), metadata={"format": "pt"})
    with pytest.MonkeyPatch.context() as older:
        older.setattr("engine.sources.lora.check_adapter_fits", lambda *args: None)
        recipe = Lora().prepare("partial", base, lora=str(partial), steps=2)
    generator = LoraGenerator("partial", Path(recipe.path), GenerationParams(steps=2), recipe.params["loras"], "cpu")
    with pytest.raises(SourceError, match=r"2 of 66 LoRA tensors match no layer .* it would load only in part"):
        generator.load()
    generator.unload()
    saved = tmp_path / "saved"  # a LoRA folder as diffusers saves one: its one file
    saved.mkdir()
    shutil.copy(file, saved / "pytorch_lora_weights.safetensors")
    assert Lora().prepare("saved", base, lora=f"{saved}:0.5").params["loras"][0]["file"].endswith("weights.safetensors")
    shutil.copy(file, saved / "other.safetensors")
    with pytest.raises(UserError, match="is a folder holding 2 .safetensors files"):
        Lora().prepare("saved", base, lora=str(saved))
    # a Hugging Face cache snapshot: its file is a link to a blob named by its hash, outside the folder
    (tmp_path / "hub" / "blobs").mkdir(parents=True)
    shutil.copy(file, tmp_path / "hub" / "blobs" / "5e3f0c9a")
    linked = tmp_path / "hub" / "snapshots" / "abc"
    linked.mkdir(parents=True)
    (linked / "pytorch_lora_weights.safetensors").symlink_to("../../blobs/5e3f0c9a")
    assert Lora().prepare("linked", base, lora=str(linked)).params["loras"][0]["sha256"] == file_sha256(file)
    # over HTTP the folder, and where its file leads, must both lie inside the server's sources folder
    from engine.service.errors import ServiceError
    from engine.service.sources import SourcePolicy, police

    checked = police("lora", {"lora": ["hub/snapshots/abc:1.0"]}, SourcePolicy(roots=(tmp_path,)), tmp_path)
    assert checked["lora"] == [f"{(tmp_path / 'hub' / 'blobs' / '5e3f0c9a').resolve()}:1.0"]
    with pytest.raises(ServiceError, match="over HTTP, paths must lie inside"):  # the folder is, its blob is not
        police("lora", {"lora": ["abc:1.0"]}, SourcePolicy(roots=(linked.parent,)), tmp_path)
    (tmp_path / "bad").mkdir()
    broken = tmp_path / "bad" / "alpha.safetensors"  # the same tensors, a metadata that is no JSON
    save_file(load_file(str(file)), str(broken), metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(UserError, match="lora_adapter_metadata is not"):
        Lora().prepare("broken", base, lora=str(broken))


def test_a_folder_whose_weights_lack_a_tensor_fails_its_load_in_one_line(models, tmp_path):
    """diffusers loads a component whose weight file lacks a tensor (a partial conversion or merge) with that
    tensor left on the meta device: moving the pipeline to its device was a NotImplementedError traceback at
    the first generation. A model_index.json nested 100000 deep was a RecursionError traceback at `source add`."""
    from engine.generate import DiffusersGenerator

    folder = tmp_path / "partial"
    shutil.copytree(models["pipelines"]["tiny-sd-ddim"], folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["conv_norm_out.weight"]
    save_file(tensors, str(weights))
    generator = DiffusersGenerator("partial", folder, GenerationParams(steps=2), "cpu")
    with pytest.raises(SourceError, match=r"its unet weight files lack 1 of its tensors \(e\.g\. conv_norm_out\."
                                          r"weight\): incomplete, or made for another config") as failure:
        generator.load()
    assert "\n" not in str(failure.value)
    (folder / "model_index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="malformed model_index.json"):
        Pipeline().prepare("deep", folder, steps=2)


def test_a_sharded_component_missing_a_shard_is_refused_at_source_add(models, tmp_path):
    """An unfinished download of a sharded model (unet/diffusion_pytorch_model-0000N-of-0000M.safetensors) was
    enrolled and failed at its first generation; an index naming ../../x read elsewhere. A configs-only folder
    (a single file's --config) keeps its index with no shard at all: that is not refused."""
    import diffusers

    from engine.generate import check_pipeline_folder

    folder = tmp_path / "sharded"
    shutil.copytree(models["pipelines"]["tiny-sd-ddim"], folder)
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", max_shard_size="200KB")
    shards = sorted((folder / "unet").glob("*-of-*.safetensors"))
    assert len(shards) > 2
    Pipeline().prepare("whole", folder, steps=2)
    shards[1].unlink()
    with pytest.raises(UserError, match=r"unet/diffusion_pytorch_model.safetensors.index.json in .* names 1 shard "
                                        r"file that is not there \(e.g. diffusion_pytorch_model-00002-of-") as failure:
        Pipeline().prepare("cut", folder, steps=2)
    assert "\n" not in str(failure.value)
    for shard in shards:
        shard.unlink(missing_ok=True)
    check_pipeline_folder(folder)  # configs only: what a --config folder is
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"conv_in.weight": "../../../etc/passwd"}}))
    with pytest.raises(UserError, match=r"names shard files outside its folder \(e.g. ../../../etc/passwd\)"):
        check_pipeline_folder(folder)


def test_an_adapter_trained_only_in_factors_of_other_names_is_not_called_inert(models, tmp_path):
    """An adapter whose recognised up factors are all zeros was refused as 'changes nothing' even when its
    trained factors used names _inert did not list (old diffusers text-encoder lora_linear_layer, PEFT
    lora_embedding_A/B): any tensor it cannot classify now means the adapter may change the base."""
    base = models["pipelines"]["tiny-sd-ddim"]
    untrained = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in _attention_lora(base).items()}
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj."
    old = untrained | {f"{te}lora_linear_layer.down.weight": torch.randn(4, 32),
                       f"{te}lora_linear_layer.up.weight": torch.randn(32, 4)}
    save_file(old, str(tmp_path / "old.safetensors"))
    assert Lora().prepare("old", base, lora=str(tmp_path / "old.safetensors")).params["loras"]  # loaded whole
    emb = "text_encoder.text_model.embeddings.token_embedding."
    peft = untrained | {f"{emb}lora_embedding_A": torch.randn(4, 1000), f"{emb}lora_embedding_B": torch.randn(32, 4)}
    save_file(peft, str(tmp_path / "embedding.safetensors"))
    with pytest.raises(UserError) as caught:  # diffusers cannot read it for this base: said so, not 'inert'
        Lora().prepare("embedding", base, lora=str(tmp_path / "embedding.safetensors"))
    assert "changes nothing" not in str(caught.value)
