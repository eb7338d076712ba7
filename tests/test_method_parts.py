"""Small pieces of the method, checked on hand-computed examples."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.aggregate import aggregate
from engine.embed import Embedder, EmbedderSpec
from engine.generate import DiffusersGenerator, GenerationParams
from index.keys import normalise_description


def test_aggregations_by_hand():
    sims = np.array([0.2, 0.9, 0.5, 0.4])
    assert aggregate(sims, "max") == pytest.approx(0.9)
    assert aggregate(sims, "mean") == pytest.approx(0.5)
    assert aggregate(sims, "knn") == pytest.approx((0.9 + 0.5 + 0.4) / 3)
    w = np.exp((sims - 0.9) / 0.05)
    assert aggregate(sims, "softmax") == pytest.approx((w * sims).sum() / w.sum())
    assert aggregate(np.array([0.3]), "knn") == pytest.approx(0.3)
    with pytest.raises(ValueError):
        aggregate(sims, "median")


def test_description_normalisation():
    assert normalise_description("  a  portrait\n of\tX ") == "a portrait of X"
    assert normalise_description("Cafe\u0301") == normalise_description("Caf\u00e9")


def test_embedder_final_and_intermediate_layer(models):
    final = Embedder(EmbedderSpec("tiny-clip", str(models["clip_checkpoint"]), str(models["clip_config"])))
    middle = Embedder(EmbedderSpec("tiny-clip", str(models["clip_checkpoint"]), str(models["clip_config"]), layer=2))
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "white")]
    a, b = final.embed(images), middle.embed(images)
    assert a.dtype == np.float32 and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
    assert final.identity != middle.identity and final.identity.endswith("/final")
    assert b.shape[1] == 64 and not np.allclose(a, b)
    assert np.allclose(final.embed(images[:1]), a[:1], atol=1e-5)  # batching does not change a vector


def test_generation_is_seeded_and_batch_independent(models):
    name, folder = next(iter(models["pipelines"].items()))
    generator = DiffusersGenerator(name, folder, GenerationParams(steps=2))
    batch = generator.generate("a portrait", [3, 4])
    single = generator.generate("a portrait", [4])[0]
    diff = np.abs(np.asarray(batch[1], np.int16) - np.asarray(single, np.int16)).max()
    assert diff <= 1 and batch[0].size == (64, 64)
    assert np.abs(np.asarray(batch[0], np.int16) - np.asarray(single, np.int16)).max() > 10
    assert generator.calls == 3


@pytest.mark.parametrize("kind", ["blip", "git", "vision-encoder-decoder"])
def test_captioners_of_each_supported_architecture(kind, tmp_path):
    from engine import zoo
    from engine.describe import Captioner

    captioner = Captioner(zoo.write_captioner(tmp_path / kind, kind=kind))
    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (64, 64), "blue")]
    captions = captioner.caption(images)
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
    assert captioner.caption(images[:1]) == captions[:1]  # deterministic (greedy decoding)
    assert all(w in zoo.CAPTION_WORDS for c in captions if c != "an image" for w in c.split())


def test_source_kinds_registry(models, tmp_path):
    """Each kind is looked up by its stored name and says what it needs; a new kind is one class and
    one `register` call, enrolled and planned through the same generic path as the built-in ones."""
    import engine
    from engine import sources
    from engine.errors import UserError
    from index.keys import canonical_json, sha256_text

    assert {k.name for k in sources.kinds()} >= {"diffusers", "api", "replay"}
    pipeline, api, replay = sources.get("diffusers"), sources.get("api"), sources.get("replay")
    assert (pipeline.generates, pipeline.needs_gpu, pipeline.costs_money) == (True, True, False)
    assert (api.generates, api.needs_gpu, api.costs_money) == (True, False, True)
    assert (replay.generates, replay.needs_gpu, replay.costs_money) == (False, False, False)
    assert "steps" in {p.name for p in pipeline.params} and "url" in {p.name for p in api.params}
    with pytest.raises(UserError, match="unknown source kind 'no-such-kind'"):
        sources.get("no-such-kind")
    # the stored fingerprints are the ones stores already hold
    assert replay.prepare("x").fingerprint == sha256_text(canonical_json(["replay", "x"]))

    class Dataset(sources.SourceKind):  # a second dataset-only kind, as a plugin would add one
        name = "test-dataset"
        generates = needs_gpu = False
        reenrol = True

        def prepare(self, name: str, note: str = "") -> sources.Recipe:
            return sources.Recipe(path=None, params={"note": note}, fingerprint=sources.fingerprint(self.name, name))

    sources.register(Dataset())
    with engine.init(tmp_path / "store", clip_config=models["clip_config"],
                     clip_checkpoint=models["clip_checkpoint"]) as ws:
        info = ws.add_source("mine", kind="test-dataset", note="from a paper")
        assert info["kind"] == "test-dataset" and ws.add_source("mine", kind="test-dataset", note="from a paper")
        (stored,) = ws.sources()
        assert sources.kind_of(stored) is sources.get("test-dataset")
        plan = ws.plan()
        assert plan.pipelines == [] and plan.params_hash == {stored.id: None}
        with pytest.raises(UserError, match="no pipeline to generate with"):
            ws.generator("mine")


def test_a_description_longer_than_the_text_encoder_is_said_once_in_one_line(models):
    """diffusers quoted the whole cut-off text at every generation (kilobytes per image past --quiet), and
    transformers warned of "indexing errors" that never happen. Read through a handler of the test's own beside
    the libraries' (theirs keep the stderr they were made with)."""
    import io
    import logging

    from engine.generate import _CUT_PROMPT, _say_cut_prompts_once

    name, folder = next(iter(models["pipelines"].items()))
    generator = DiffusersGenerator(name, folder, GenerationParams(steps=1))
    generator.load()
    seen = io.StringIO()
    handlers = {library: logging.StreamHandler(seen) for library in ("diffusers", "transformers")}
    for library, handler in handlers.items():
        logging.getLogger(library).addHandler(handler)
    try:
        _say_cut_prompts_once()  # the filter a load gives each handler, given to these too
        _CUT_PROMPT.said = False  # once a process: an earlier test may have said it
        long = " ".join(f"word{i}" for i in range(200))
        generator.generate(long, [1])
        generator.generate(long + " again", [2, 3])
    finally:
        for library, handler in handlers.items():
            logging.getLogger(library).removeHandler(handler)
    assert seen.getvalue().strip() == ("a description is longer than a generator's text encoder reads (77 tokens): "
                                       "its end is left out (said once)"), seen.getvalue()[-2000:]
