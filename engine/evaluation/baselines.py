"""Few-shot baselines on the same CLIP features: what a user could do with k labelled originals per source.

Each draw samples k originals per source for training; every other original is a test query,
and resynthesis (alone and with those k originals as extra references) is scored on the very same
test queries, so the comparison is paired.
"""
from __future__ import annotations

import warnings

import numpy as np
from tqdm import tqdm

from engine.metrics import accuracy
from engine.scoring import Variant, score_matrix

SHOTS = (1, 2, 5, 10, 20)
BASELINES = ("nearest-centroid", "knn", "linear-svm", "logistic-regression")


def make_classifier(name: str, shots: int):
    """A fresh scikit-learn classifier; features are L2-normalised CLIP vectors."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
    from sklearn.svm import LinearSVC

    if name == "nearest-centroid":
        return NearestCentroid()
    if name == "knn":
        return KNeighborsClassifier(n_neighbors=min(3, shots), metric="cosine")
    if name == "linear-svm":
        return LinearSVC(C=1.0)
    if name == "logistic-regression":
        return LogisticRegression(C=10.0, max_iter=2000)
    raise ValueError(f"unknown baseline {name!r} (choose from {', '.join(BASELINES)})")


def _labelled(labels: np.ndarray, classes: int) -> list[int]:
    """The sources with originals: an enrolled source absent from the labelled set has none to train on or
    test, and must not empty the comparison for all the others."""
    return [c for c in range(classes) if (labels == c).any()]


def available_shots(labels: np.ndarray, classes: int, wanted=SHOTS) -> list[int]:
    """The k of `wanted` that leave at least one test original in every source that has originals."""
    smallest = min((int((labels == c).sum()) for c in _labelled(labels, classes)), default=0)
    return [k for k in wanted if k < smallest]


def shots_not_measured(labels: np.ndarray, classes: int) -> str:
    """Why no k can be drawn: the smallest labelled source's originals."""
    counts = {c: int((labels == c).sum()) for c in _labelled(labels, classes)}
    smallest = min(counts.values(), default=0)
    return (f"a source has only {smallest} original(s): k labelled originals per source plus one to test "
            "need at least 2 in every source")


def draw_split(labels: np.ndarray, classes: int, shots: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """k training originals per source (of those with originals), the rest for testing."""
    train = np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False)
                            for c in _labelled(labels, classes)])
    test = np.setdiff1d(np.arange(len(labels)), train)
    return np.sort(train), test


def fit_predict(name: str, shots: int, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    model = make_classifier(name, shots)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on 1-shot sets
        model.fit(x_train, y_train)
        return model.predict(x_test)


def run_fewshot(originals: np.ndarray, resyntheses: np.ndarray, references, labels: np.ndarray, classes: int,
                variant: Variant, draws: int = 5, seed: int = 0, shots: list[int] | None = None,
                queries: dict[str, np.ndarray] | None = None, progress: bool = True) -> dict:
    """Accuracy mean/std per method and k. `queries` maps a name to replacement query features (perturbed
    copies of the originals): training stays on clean originals, testing uses those features."""
    shots = available_shots(labels, classes) if shots is None else shots
    rng = np.random.default_rng(seed)
    query_sets = {"clean": originals, **(queries or {})}
    results: dict[str, dict[str, dict[int, list[float]]]] = {
        q: {m: {k: [] for k in shots} for m in ("resynthesis", "resynthesis+refs", *BASELINES)} for q in query_sets}
    tasks = [(k, d) for k in shots for d in range(draws)]
    for k, _ in tqdm(tasks, desc="few-shot draws", unit="draw", disable=not progress or not tasks, leave=False):
        train, test = draw_split(labels, classes, k, rng)
        for qname, feats in query_sets.items():
            table = results[qname]
            # queries are `feats` (maybe perturbed); references are always clean
            stacked = np.concatenate([originals, feats[test]])
            rows = np.arange(len(originals), len(stacked))
            refs = list(references) + [references[i] for i in test]
            source = np.concatenate([labels, labels[test]])
            plain = score_matrix(stacked, resyntheses, refs, variant, rows=rows)
            table["resynthesis"][k].append(accuracy(labels[test], plain.argmax(1)))
            with_refs = score_matrix(stacked, resyntheses, refs, Variant(**{**variant.__dict__, "fewshot": True}),
                                     orig_source=source, train=train, rows=rows)
            table["resynthesis+refs"][k].append(accuracy(labels[test], with_refs.argmax(1)))
            for name in BASELINES:
                try:
                    predicted = fit_predict(name, k, originals[train], labels[train], feats[test])
                except ValueError:  # degenerate features (all identical): this draw is not measured, shown "–"
                    continue
                table[name][k].append(accuracy(labels[test], predicted))
    why = {} if shots else {"not_measured": shots_not_measured(labels, classes)}
    return {q: {"shots": shots, "draws": draws, **why,
                "methods": {m: {str(k): {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": len(v)}
                                for k, v in per_k.items() if v}
                            for m, per_k in table.items()}}
            for q, table in results.items()}
