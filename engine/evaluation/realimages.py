"""How often a real (camera) photograph is mistaken for a generated image, when a manifest has rows of
role "real": the "real" rule `resynth calibrate` fits (engine.calibration), cross-fitted so no image is
measured against a threshold or references it shaped."""
from __future__ import annotations

import numpy as np

from engine.calibration import REAL_K, real_values
from engine.metrics import binary_auroc

FOLDS = 2


def _folds(n: int, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    folds = np.empty(n, np.int64)
    folds[order] = np.arange(n) % FOLDS
    return folds


def real_image_figures(originals: np.ndarray, resyntheses: np.ndarray, real: np.ndarray, frr: float,
                       seed: int = 0, k: int = REAL_K) -> dict:
    """Two-fold cross-fitted figures of the "real" rule. Per pair of folds: the real references are the
    other real fold, the threshold is fitted (at `frr` of generated called real) on the other fold of the
    generated originals; the measured fold's real images and originals are then decided.

    false_positive_rate: share of real images NOT called real (each would be attributed to a source);
    generated_called_real: share of generated originals called real; auroc: real against generated on the
    rule's value (no threshold). Without at least 2 real images and 2 originals: {"not_measured": why}."""
    n_real, n_orig = len(real), len(originals)
    if n_real < FOLDS or n_orig < FOLDS:
        return {"real_images": n_real, "not_measured": f"needs at least {FOLDS} real images and {FOLDS} originals"}
    generated = np.concatenate([originals, resyntheses])
    real_folds, orig_folds = _folds(n_real, seed), _folds(n_orig, seed + 1)
    missed = called = 0
    real_vals = np.empty(n_real)
    gen_vals = np.zeros(n_orig)
    for f in range(FOLDS):
        refs = real[real_folds != f]
        values_real = real_values(real[real_folds == f], refs, generated, k)
        values_gen = real_values(originals, refs, generated, k)
        real_vals[real_folds == f] = values_real
        gen_vals += values_gen / FOLDS
        for g in range(FOLDS):
            fit = values_gen[(orig_folds != g) & np.isfinite(values_gen)]
            threshold = float(np.quantile(fit, 1 - frr, method="higher"))
            missed += int((values_real <= threshold).sum()) if g == 0 else 0  # each real image once per f
            called += int((values_gen[orig_folds == g] > threshold).sum())
    labels = np.r_[np.ones(n_real, bool), np.zeros(n_orig, bool)]
    return {"real_images": n_real, "generated_originals": n_orig, "k": k, "target_generated_called_real": frr,
            "false_positive_rate": missed / n_real, "real_called_real": 1 - missed / n_real,
            "generated_called_real": called / (n_orig * FOLDS),
            "auroc": binary_auroc(labels, np.r_[real_vals, gen_vals]), "folds": FOLDS}
