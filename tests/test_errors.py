"""Every user mistake gives one line on stderr, a non-zero exit code, and no traceback."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import run_cli


def _fails(capsys, *argv, match: str) -> None:
    capsys.readouterr()
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("resynth: error:") and match in last, err


@pytest.fixture
def image_and_prompt(originals):
    return originals[0]["image"], originals[0]["prompt"]


def test_bad_query_inputs(store_dir, image_and_prompt, capsys, tmp_path):
    image, prompt = image_and_prompt
    s = ("--store", store_dir)
    _fails(capsys, "attribute", tmp_path / "nope.png", "--prompt", "x", *s, match="image not found")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    _fails(capsys, "attribute", garbage, "--prompt", "x", *s, match="cannot decode image")
    _fails(capsys, "attribute", image, "--prompt", "   ", *s, match="empty prompt")
    _fails(capsys, "attribute", image, "--prompt", prompt, "--sources", "midjourney", *s, match="unknown source")
    _fails(capsys, "attribute", image, *s, match="no description")
    _fails(capsys, "attribute", *s, match="nothing to attribute")
    from engine.errors import UserError
    from engine.request import attribute  # refused before the workspace is used: the counts agree in number

    with pytest.raises(UserError, match=r"^2 prompts for 1 image: give one, or one per image$"):
        attribute(None, [image], ["a", "b"])
    bad_queries = tmp_path / "q.jsonl"
    bad_queries.write_text('{"img": "a.png"}\n')
    _fails(capsys, "attribute", "--queries", bad_queries, *s, match="q.jsonl:1")
    _fails(capsys, "attribute", image, "--prompt", "x", "--per-source", "0", *s, match="--per-source")
    import torch

    if not torch.cuda.is_available():  # was "CLIP checkpoint ... does not match the architecture" (exit 2 still)
        _fails(capsys, "attribute", image, "--prompt", "x", "--device", "cuda", *s,
               match="--device cuda: this machine has no CUDA device (or no driver); use --device cpu")
    _fails(capsys, "source", "remove", "midjourney", *s, match="unknown source")
    _fails(capsys, "stats", "--store", tmp_path / "no-store", match="no store at")


def test_bad_model_folders(store_dir, models, capsys, tmp_path, copy_of):
    s = ("--store", store_dir)
    _fails(capsys, "source", "add", "x", tmp_path / "missing", *s, match="pipeline folder not found")
    (tmp_path / "red.png").write_bytes(b"not a model")  # a file where a folder belongs: said so, not "not found"
    _fails(capsys, "source", "add", "x", tmp_path / "red.png", *s, match="red.png is a file, not a diffusers pipeline")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, "source", "add", "x", empty, *s, match="no model_index.json")
    broken = copy_of(next(iter(models["pipelines"].values())), "broken")
    (broken / "model_index.json").write_text("{not json")
    _fails(capsys, "source", "add", "x", broken, *s, match="malformed model_index.json")
    name, folder = next(iter(models["pipelines"].items()))
    _fails(capsys, "source", "add", name, folder, *s, match="already exists")
    _fails(capsys, "source", "add", "y", folder, "--scheduler", "NoSuchScheduler", *s, match="unknown scheduler")
    # a recipe left at a default is added, with the recipe shown and a warning that it must match the images
    assert run_cli("source", "add", "y", folder, "--steps", 3, *s) == 0
    out = capsys.readouterr()
    assert "recipe: steps 3, guidance 7" in out.out and "y uses the default guidance 7" in out.err
    assert run_cli("source", "add", "y2", folder, "--guidance", 5, "--json", *s) == 0  # --json carries it too
    added = json.loads(capsys.readouterr().out)
    assert added["warnings"][0].startswith("y2 uses the default steps 30")
    assert added["params"]["guidance"] == 5.0 and added["recipe"].startswith("steps 30, guidance 5")  # as text
    import engine

    with engine.open(store_dir) as ws:  # the library answers the same warning (HTTP returns this answer)
        assert ws.add_source("y3", folder, guidance=4)["warnings"][0].startswith("y3 uses the default steps 30")
        assert "warnings" not in ws.add_source("y4", folder, steps=4, guidance=6)
    # Garbage or truncated weight files are refused at `source add`, without loading them.
    corrupt = copy_of(folder, "corrupt")
    for weights in corrupt.rglob("*.safetensors"):
        weights.write_bytes(b"\0" * 64)
    _fails(capsys, "source", "add", "corrupt", corrupt, *s, match="corrupt weight file")
    truncated = copy_of(folder, "truncated")
    for weights in truncated.rglob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:-10])
    _fails(capsys, "source", "add", "truncated", truncated, *s, match="truncated or padded")
    # configs without weights (a single-file source's --config folder): refused at `source add`, not first use
    configs = copy_of(folder, "configs-only")
    for weights in (configs / "unet").glob("*.safetensors"):
        weights.unlink()
    _fails(capsys, "source", "add", "configs", configs, *s, match="no weight files (*.safetensors, *.bin) in unet:")


def test_a_source_that_breaks_later_is_reported_not_fatal(store_dir, models, originals, capsys, copy_of):
    """Weights damaged after `source add`: that source is 'not scored' with its reason, the others are scored;
    asking for it alone is a one-line error with exit 3."""
    s = ("--store", store_dir)
    name, folder = next(iter(models["pipelines"].items()))
    fragile = copy_of(folder, "fragile")
    assert run_cli("source", "add", "fragile", fragile, *s, "--steps", "2", "--guidance", "6") == 0
    for weights in (fragile / "unet").glob("*.safetensors"):
        weights.write_bytes(b"\0" * 64)
    image, prompt = originals[0]["image"], "a brand new description for this test"
    capsys.readouterr()
    assert run_cli("attribute", image, "--prompt", prompt, "--per-source", 1, "--json", "--quiet", *s) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert "fragile" in result["failed"] and "fragile" in result["missing"]
    assert len(result["scores"]) == len(models["pipelines"])  # every other source scored
    assert run_cli("attribute", image, "--prompt", prompt + " again", "--sources", "fragile", "--quiet", *s) == 3
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "fragile" in err and len(err.splitlines()) == 1
    assert err.count("source 'fragile'") == 1, err  # said once, not "source 'fragile': source 'fragile': ..."


def test_bad_clip_and_store_binding(models, capsys, tmp_path, copy_of):
    store = tmp_path / "store"
    cfg, ckpt = models["clip_config"], models["clip_checkpoint"]
    _fails(capsys, "init", "--store", store, "--clip-config", cfg, "--clip-checkpoint", tmp_path / "none.bin",
           match="CLIP checkpoint not found")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    _fails(capsys, "init", "--store", store, "--clip-config", cfg, "--clip-checkpoint", junk,
           match="not a readable checkpoint")  # and never PyTorch's advice to load unsafely
    capsys.readouterr()
    run_cli("init", "--store", store, "--clip-config", cfg, "--clip-checkpoint", junk)
    assert "weights_only" not in capsys.readouterr().err
    _fails(capsys, "init", "--store", store, "--clip-model", "NoSuchArch", "--clip-checkpoint", ckpt,
           match="unknown CLIP architecture")
    _fails(capsys, "init", "--store", store, "--clip-model", "ViT-L-14-33", "--clip-checkpoint", ckpt,
           match="did you mean ViT-L-14-336?")  # a typo of a listed one is named
    _fails(capsys, "init", "--store", store, "--clip-config", cfg, "--clip-checkpoint", ckpt, "--clip-layer", "99",
           match="out of range")
    _fails(capsys, "init", "--store", store, "--clip-checkpoint", ckpt, match="exactly one of")
    capsys.readouterr()
    assert run_cli("init", "--store", store, "--clip-config", cfg, "--clip-checkpoint", ckpt) == 0
    assert capsys.readouterr().out.strip().endswith("(64-d); captioner: none")  # the line says what it bound
    _fails(capsys, "init", "--store", store, "--clip-config", cfg, "--clip-checkpoint", ckpt, "--clip-layer", "top",
           match="--clip-layer must be")
    # Same store, another embedder (the final layer instead of the default middle block): refused.
    _fails(capsys, "init", "--store", store, "--clip-config", cfg, "--clip-checkpoint", ckpt, "--clip-layer", "final",
           match="or move this store to it with `resynth reembed`")  # "already bound ...; use another --store"
    assert run_cli("init", "--store", store, "--clip-config", cfg, "--clip-checkpoint", ckpt, "--clip-layer", "2") == 0
    # The checkpoint the store is bound to changes on disk: refused at use.
    moved = copy_of(ckpt, "ckpt.bin")
    other = tmp_path / "store2"
    assert run_cli("init", "--store", other, "--clip-config", cfg, "--clip-checkpoint", moved) == 0
    import torch
    state = torch.load(moved)
    next(iter(state.values())).add_(1.0)
    torch.save(state, moved)
    manifest = tmp_path / "m.csv"
    from PIL import Image
    Image.new("RGB", (16, 16)).save(tmp_path / "q.png")
    manifest.write_text("image,source,description,role\nq.png,a,b,original\n")
    _fails(capsys, "ingest", manifest, "--store", other, match="is bound to embedder")


def test_bad_manifests(store_dir, originals, capsys, tmp_path):
    s = ("--store", store_dir)
    image = originals[0]["image"]
    cases = {
        "missing.csv": (f"image,source\n{image},a\n", "missing column(s) description, role"),
        "role.csv": (f"image,source,description,role\n{image},a,b,copy\n", "role must be"),
        "empty-desc.csv": (f"image,source,description,role\n{image},a,  ,original\n", "empty description"),
        "seed.csv": (f"image,source,description,role,seed\n{image},a,b,original,x\n", "seed must be an integer"),
        "noimage.csv": ("image,source,description,role\nnope.png,a,b,original\n", "image not found"),
        "bad.jsonl": ('{"image": 1\n', "not valid JSON"),
        "empty.csv": ("", "no rows"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        _fails(capsys, "ingest", tmp_path / name, *s, match=message)
    _fails(capsys, "ingest", tmp_path / "none.csv", *s, match="manifest not found")
    _fails(capsys, "ingest", tmp_path, *s, match="is a folder: give the manifest file in it (.csv or .jsonl) (")
    # evaluate on one source: nothing to tell apart (sklearn's baselines raised a traceback); refused before any model
    a, b = originals[0]["image"], originals[1]["image"]
    (tmp_path / "one.csv").write_text(f"image,source,description,role,seed\n{a},a,d,original,\n{b},a,d,resynthesis,0\n")
    _fails(capsys, "evaluate", tmp_path / "one.csv", "--out", tmp_path / "eval", *s,
           match="evaluate needs scorable originals of at least 2 sources, it has 1 (a)")
    # --clip-layer with the store's embedder was ignored without a word
    with (tmp_path / "one.csv").open("a") as rows:
        rows.write(f"{originals[2]['image']},b,d,original,\n{originals[3]['image']},b,d,resynthesis,1\n")
    _fails(capsys, "evaluate", tmp_path / "one.csv", "--out", tmp_path / "eval", "--clip-layer", "4", *s,
           match="--clip-layer applies to --clip-model or --clip-config")
    # --layers names itself (not --clip-layer) and every value it takes, before any embedding
    for layers, message in (("99", "--layers 99 is out of range: expected base (or store), final, mid or a block "
                                   "number from 1 to"),
                            ("foo", "--layers: expected base (or store), final, mid or a block number from 1 to")):
        _fails(capsys, "evaluate", tmp_path / "one.csv", "--out", tmp_path / "eval", "--layers", layers, *s,
               match=message)
    (tmp_path / "a-file").write_text("")  # said "expected a folder, got a file: .../a-file/features"
    _fails(capsys, "evaluate", tmp_path / "one.csv", "--out", tmp_path / "a-file", *s,
           match=f"--out {tmp_path / 'a-file'} is a file: give a folder")


def test_console_script_help_and_error_exit():
    """The installed entry point: --help explains, a mistake exits non-zero with one line."""
    out = subprocess.run([sys.executable, "-m", "engine.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "resynthesis" in out.stdout and "attribute" in out.stdout
    out = subprocess.run([sys.executable, "-m", "engine.cli", "stats", "--store", "/nonexistent/x", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no store at" in out.stderr


def test_manifest_with_bom_and_aliases_is_read(originals, tmp_path):
    from engine.manifest import read_manifest

    image = originals[0]["image"]
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffPath,Generator,Prompt,Role,Seed,extra\n".encode() +
                     f"{image},a,  some   text ,Original,3,x\n".encode())
    [row] = read_manifest(path)
    assert (row.image, row.source, row.description, row.role, row.seed) == (image, "a", "some text", "original", 3)


def test_http_refuses_a_form_field_it_does_not_know(models, tmp_path):
    """The CLI refuses an unknown flag; the HTTP form used to ignore an unknown field, so `max-cost` (the flag's
    spelling) ran with no cost limit at all. It is now 400 bad_option naming the field to send."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from PIL import Image

    import engine
    from engine.errors import OptionError
    from engine.options import Options
    from engine.service.app import create_app
    from engine.service.config import Limits
    from engine.service.core import Service

    Options.check_fields(["image", "prompt", "per_source", "max_cost"])
    with pytest.raises(OptionError, match="send adaptive=false"):
        Options.check_fields(["--no-adaptive"])
    engine.init(tmp_path / "s", clip_config=models["clip_config"], clip_checkpoint=models["clip_checkpoint"]).close()
    client = TestClient(create_app(Service.open(tmp_path / "s", Limits()), None), raise_server_exceptions=False)
    png = tmp_path / "q.png"
    Image.new("RGB", (16, 16)).save(png)
    for field, hint in (("max-cost", "the field is max_cost"), ("promt", "the fields are image, prompt")):
        answer = client.post("/v1/attribute", files={"image": ("q.png", png.read_bytes(), "image/png")},
                             data={"prompt": "a cat", field: "0"})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["code"] == "bad_option" and f"unknown field {field!r}" in error["message"], error
        assert hint in error["message"]
