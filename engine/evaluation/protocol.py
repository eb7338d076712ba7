"""The paper's protocol on precomputed features: variants, baselines, open set, calibration, robustness.

Pure numpy/scikit-learn over an EvalSet whose features are already embedded, so it is fast to test
and every figure of report.json comes from exactly one place.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from engine.aggregate import AGGREGATIONS
from engine.crossfit import calibration_report, leave_one_source_out
from engine.evaluation.baselines import available_shots, run_fewshot
from engine.fitting import open_set_context  # noqa: F401  (the method's, used here too)
from engine.labelled import EvalSet
from engine.metrics import accuracy, classification_report
from engine.openset import DEFAULT_OPEN_SET_SCORE, FALSE_REJECT
from engine.options import Options
from engine.scoring import DISTANCES, Variant, adaptive_score_matrix, neighbour_score_matrix, score_matrix

# The engine's default options (engine.options.Options): its mode, aggregation and references per source.
# ENGINE_DEFAULT is their scoring rule in resynthesis mode, the reference row of the variant grid; the
# engine's actual default (Options().mode) is measured beside the other modes (compare_modes).
ENGINE_OPTIONS = Options()
ENGINE_DEFAULT = Variant(aggregation=ENGINE_OPTIONS.aggregation, per_source=ENGINE_OPTIONS.references)
K_VALUES = (1, 2, 3, 5, 10, 20)


def variant_grid(layers: list[str], max_k: int) -> list[Variant]:
    """Every distance x aggregation x K per layer, plus resynthesis + leave-one-out original references."""
    ks = sorted({k for k in K_VALUES if k <= max_k} | {max_k})
    grid = [Variant(layer, d, a, k) for layer in layers for d in DISTANCES for a in AGGREGATIONS for k in ks]
    grid += [Variant(layer, "cosine", a, min(2, max_k), fewshot=True) for layer in layers for a in AGGREGATIONS]
    return grid


def default_variant(layer: str, max_k: int) -> Variant:
    return Variant(layer, ENGINE_DEFAULT.distance, ENGINE_DEFAULT.aggregation, min(ENGINE_DEFAULT.per_source, max_k))


def _summary(report: dict) -> dict:
    return {k: report[k] for k in ("accuracy", "macro_accuracy", "top3_accuracy", "macro_auroc", "queries", "correct",
                                   "accuracy_ci95", "tied_best")}


def evaluate_variants(evalset: EvalSet, features: dict[str, tuple[np.ndarray, np.ndarray]], references,
                      grid: list[Variant], progress: bool = True) -> tuple[list[dict], dict[Variant, np.ndarray]]:
    labels = evalset.orig_source
    rows, matrices = [], {}
    for variant in tqdm(grid, desc="variants", unit="variant", disable=not progress, leave=False):
        originals, resyntheses = features[variant.layer]
        scores = score_matrix(originals, resyntheses, references, variant, orig_source=labels)
        matrices[variant] = scores
        rows.append({"variant": variant.name, **variant.__dict__,
                     **_summary(classification_report(labels, scores, evalset.sources))})
    return rows, matrices


def pick_best(rows: list[dict], default_name: str) -> dict:
    """Highest accuracy, then macro AUROC; the engine default wins exact ties (no change without evidence)."""
    def key(row):
        return (row["accuracy"], row["macro_auroc"] or 0.0, row["variant"] == default_name, -row["per_source"])
    return max(rows, key=key)


def factor_means(rows: list[dict]) -> dict:
    """Per setting of each factor, accuracy and macro AUROC averaged over every other factor
    (resynthesis-only variants): a steadier guide to defaults than one saturated best row."""
    plain = [r for r in rows if not r["fewshot"]]
    out: dict[str, dict] = {}
    for factor in ("layer", "distance", "aggregation", "per_source"):
        values = sorted({r[factor] for r in plain}, key=str)
        out[factor] = {str(v): {"accuracy": float(np.mean([r["accuracy"] for r in plain if r[factor] == v])),
                                "macro_auroc": float(np.nanmean([r["macro_auroc"] if r["macro_auroc"] is not None
                                                                 else np.nan for r in plain if r[factor] == v]))}
                       for v in values}
    return out


def run_protocol(evalset: EvalSet, features: dict[str, tuple[np.ndarray, np.ndarray]], primary: str,
                 perturbed: dict[str, np.ndarray] | None = None, draws: int = 5, seed: int = 0,
                 frr: float = FALSE_REJECT, progress: bool = True) -> dict:
    """Everything report.json holds. `features` maps a layer label to (originals, resyntheses) vectors;
    `perturbed` maps a perturbation label to the originals' vectors (primary layer) after it."""
    references = evalset.references()
    max_k = evalset.max_per_source()
    labels, names = evalset.orig_source, evalset.sources
    layers = list(features)
    grid = variant_grid(layers, max_k)
    rows, matrices = evaluate_variants(evalset, features, references, grid, progress)
    default = default_variant(primary, max_k)
    best_row = pick_best(rows, default.name)
    best = next(v for v in grid if v.name == best_row["variant"])
    default_scores = matrices[default]

    originals, resyntheses = features[primary]
    fewshot = run_fewshot(originals, resyntheses, references, labels, len(names), default, draws=draws,
                          seed=seed, progress=progress)["clean"]
    groups = evalset.orig_desc
    modes = compare_modes(evalset, originals, resyntheses, references, default)
    report = {
        "dataset": {"originals": evalset.n_originals, "resyntheses": len(evalset.res_hash),
                    "descriptions": len(evalset.descriptions), "sources": names,
                    "originals_per_source": {n: int((labels == c).sum()) for c, n in enumerate(names)},
                    "max_per_source": max_k, "layers": layers, "primary_layer": primary,
                    "chance": 1 / len(names),
                    **{k: v for k, v in evalset.usage().items() if k.startswith("skipped")}},
        "engine_default": engine_default(default, modes),
        "resynthesis_default": {"variant": default.name, "mode": "resynthesis", **default.__dict__,
                                **classification_report(labels, default_scores, names)},
        "best_variant": {"variant": best.name, **best.__dict__,
                         **classification_report(labels, matrices[best], names)},
        "best_resynthesis_only": pick_best([r for r in rows if not r["fewshot"]], default.name)["variant"],
        "modes": modes,
        "factor_means": factor_means(rows),
        "variants": rows,
        "fewshot": fewshot,
        "open_set": leave_one_source_out(default_scores, labels, groups, names, frr,
                                         context=open_set_context(evalset, originals, resyntheses, references,
                                                                  default.per_source),
                                         headline=DEFAULT_OPEN_SET_SCORE),
        "calibration": calibration_report(default_scores, labels, groups),
        "score_distributions": _score_distributions(default_scores, labels, names),
    }
    if perturbed:
        report["robustness"] = robustness(evalset, originals, resyntheses, references, default, perturbed,
                                          draws, seed, progress)
    return report


def engine_default(variant: Variant, modes: dict) -> dict:
    """What `resynth attribute` does with no option given (engine.options.Options), and its figures: those
    of its mode in the modes comparison, at the variant's references per source (K, capped by the data)."""
    options = ENGINE_OPTIONS
    return {"from": "`resynth attribute` with no option", "mode": options.mode, "aggregation": options.aggregation,
            "references": variant.per_source, "references_option": options.references,
            "neighbours": options.neighbours, "layer": variant.layer,
            "distance": variant.distance, **modes[options.mode]}


def compare_modes(evalset: EvalSet, originals: np.ndarray, resyntheses: np.ndarray, references,
                  variant: Variant) -> dict:
    """The engine's modes side by side on the primary layer, with the engine's defaults: resynthesis (the
    description's references), dataset (nearest stored resyntheses of any description, no generation),
    combined (both, the default), and adaptive resynthesis replayed in seed order. Generations: what a
    new description costs per query."""
    from engine.options import DECISIVE_MARGIN

    options = ENGINE_OPTIONS
    labels, names = evalset.orig_source, evalset.sources
    args = (originals, resyntheses, evalset.res_source, evalset.orig_hash, evalset.res_hash, len(names),
            options.neighbours, variant.aggregation)
    matrices = {"resynthesis": score_matrix(originals, resyntheses, references, variant),
                "dataset": neighbour_score_matrix(*args),
                "combined": neighbour_score_matrix(*args, references=references, per_source=variant.per_source)}
    generations: dict[str, float] = {"resynthesis": options.per_source * len(names), "dataset": 0,
                   "combined": options.per_source * len(names)}
    budget = min(options.per_source, evalset.max_per_source())
    adaptive, cost = adaptive_score_matrix(originals, resyntheses, references,
                                           Variant(variant.layer, variant.distance, variant.aggregation, budget),
                                           budget, DECISIVE_MARGIN)
    matrices[f"resynthesis, adaptive K<={budget}"] = adaptive
    generations[f"resynthesis, adaptive K<={budget}"] = round(float(cost.mean()), 2)
    generations["resynthesis"] = generations["combined"] = budget * len(names)
    return {mode: {"default": mode == options.mode, "generations_per_new_description": generations[mode],
                   **_summary(classification_report(labels, scores, names))} for mode, scores in matrices.items()}


def _score_distributions(scores: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """Per source: its score on its own originals and on everyone else's (what a threshold separates)."""
    out = {}
    for c, name in enumerate(names):
        column = scores[:, c]
        own, other = column[(labels == c) & np.isfinite(column)], column[(labels != c) & np.isfinite(column)]
        out[name] = {"own": own.tolist(), "other": other.tolist()}
    return out


def robustness(evalset: EvalSet, originals: np.ndarray, resyntheses: np.ndarray, references, variant: Variant,
               perturbed: dict[str, np.ndarray], draws: int, seed: int, progress: bool) -> dict:
    """Accuracy against strength: resynthesis on every original, baselines at one k on paired splits."""
    labels, classes = evalset.orig_source, len(evalset.sources)
    shots = available_shots(labels, classes)
    k = max([s for s in shots if s <= 5], default=None)
    table: dict[str, dict] = {}
    fewshot = (run_fewshot(originals, resyntheses, references, labels, classes, variant, draws=draws, seed=seed,
                           shots=[k], queries=perturbed, progress=progress) if k else {})
    for name, feats in {"clean": originals, **perturbed}.items():
        stacked = np.concatenate([originals, feats])
        rows = np.arange(len(originals), len(stacked))
        scores = score_matrix(stacked, resyntheses, list(references) * 2, variant, rows=rows)
        kind, _, strength = name.partition("-")
        entry: dict[str, Any] = {"kind": kind, "strength": float(strength) if strength else None,
                 "resynthesis_all": accuracy(labels, scores.argmax(1))}
        if name in fewshot:
            entry["fewshot"] = {m: v[str(k)]["mean"] for m, v in fewshot[name]["methods"].items() if str(k) in v}
        table[name] = entry
    return {"shots": k, "draws": draws, "variant": variant.name, "conditions": table}
