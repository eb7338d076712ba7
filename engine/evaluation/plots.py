"""PNG figures of a report (matplotlib, Agg backend: no display needed). Each reads report.json fields only."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.errors import plural


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion(report: dict, path: Path) -> Path:
    plt = _pyplot()
    data = report["resynthesis_default"]["confusion"]
    matrix = np.array(data["matrix"], dtype=float)
    names = data["labels"]
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.6 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted source")
    ax.set_ylabel("true source")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, f"{int(count)}", ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    ax.set_title(f"confusion, {report['resynthesis_default']['variant']}")
    fig.colorbar(image, ax=ax, label="share of true source")
    return _save(fig, path)


def shots(report: dict, path: Path) -> Path:
    plt = _pyplot()
    fewshot = report["fewshot"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, per_k in fewshot["methods"].items():
        ks = sorted(int(k) for k in per_k)
        if not ks:
            continue
        mean = np.array([per_k[str(k)]["mean"] for k in ks])
        std = np.array([per_k[str(k)]["std"] for k in ks])
        style = "-o" if method.startswith("resynthesis") else "--s"
        ax.plot(ks, mean, style, label=method)
        ax.fill_between(ks, mean - std, mean + std, alpha=0.15)
    ax.axhline(report["dataset"]["chance"], color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(fewshot["shots"], [str(k) for k in fewshot["shots"]])
    ax.set_xlabel("labelled originals per source (k)")
    ax.set_ylabel(f"accuracy (mean ± std over {plural(fewshot['draws'], 'draw')})")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("resynthesis vs few-shot baselines")
    return _save(fig, path)


def score_distributions(report: dict, path: Path) -> Path:
    plt = _pyplot()
    data = report["score_distributions"]
    names = list(data)
    cols = min(4, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        own, other = np.array(data[name]["own"]), np.array(data[name]["other"])
        values = np.concatenate([own, other])
        bins = np.linspace(values.min(), values.max(), 20) if values.size and np.ptp(values) > 0 else 10
        ax.hist(other, bins=bins, alpha=0.6, label="other sources' originals", density=True)
        ax.hist(own, bins=bins, alpha=0.6, label="own originals", density=True)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"per-source scores ({report['resynthesis_default']['variant']})")
    return _save(fig, path)


def reliability(report: dict, path: Path) -> Path:
    plt = _pyplot()
    calibration = report["calibration"]
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ece = lambda v: "not measured" if v is None else f"{v:.3f}"  # noqa: E731
    for key, label in (("reliability_default", f"T={calibration['default_temperature']:g} (default), "
                                                f"ECE {ece(calibration['ece_default'])}"),
                       ("reliability_calibrated",
                        f"fitted T (cross-fitted), ECE {ece(calibration['ece_calibrated'])}")):
        table = [row for row in calibration.get(key) or [] if row["count"]]
        if not table:
            continue
        ax.plot([r["confidence"] for r in table], [r["accuracy"] for r in table], "-o", label=label)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("reliability diagram")
    return _save(fig, path)


def robustness(report: dict, path: Path) -> Path:
    plt = _pyplot()
    conditions = report["robustness"]["conditions"]
    kinds = sorted({c["kind"] for c in conditions.values() if c["kind"] != "clean"})
    clean = conditions["clean"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.4 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        items = sorted(((c["strength"], c) for c in conditions.values() if c["kind"] == kind), key=lambda x: x[0])
        xs = [s for s, _ in items]
        ax.plot(xs, [c["resynthesis_all"] for _, c in items], "-o", label="resynthesis (all)")
        ax.axhline(clean["resynthesis_all"], color="C0", lw=0.6, ls=":")
        for i, method in enumerate((items[0][1].get("fewshot") or {})):
            ax.plot(xs, [c["fewshot"][method] for _, c in items], "--s", ms=3, color=f"C{i + 1}",
                    label=f"{method} (k={report['robustness']['shots']})")
        ax.set_title(kind)
        ax.set_xlabel("strength")
        ax.set_ylim(0, 1.02)
    axes.flat[0].set_ylabel("accuracy")
    axes.flat[-1].legend(fontsize=6, loc="lower right")
    return _save(fig, path)


def open_set(report: dict, path: Path) -> Path:
    """Mean unknown-source AUROC and unknowns rejected at the target false-reject rate, per open-set score."""
    plt = _pyplot()
    section = report["open_set"]
    scores = {n: f for n, f in section["scores"].items() if f.get("auroc") is not None}
    names = list(scores)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * max(len(names), 1), 3.8))
    ax.bar(x - 0.2, [scores[n]["auroc"] for n in names], 0.4, label="mean AUROC (unknown vs known)")
    ax.bar(x + 0.2, [scores[n]["unknown_rejected_at_frr"] for n in names], 0.4,
           label=f"unknowns rejected at {100 * section['target_false_reject']:.0f}% known false reject")
    ax.set_xticks(x, [n + (" *" if n == section.get("default_score") else "") for n in names],
                  rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.02)
    # below the axes: inside, it covered the last scores' bars (the default score's among them)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.24), ncol=2, frameon=False)
    ax.set_title("open-set scores, each source left out (* default)", fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from engine.errors import writing

    path = Path(path)
    fig.tight_layout()
    try:
        with writing(path):
            fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def write_all(report: dict, folder: Path) -> dict[str, str]:
    """Every plot the report supports; returns name -> file name."""
    folder = Path(folder)
    made = {"confusion": confusion(report, folder / "confusion.png"),
            "shots": shots(report, folder / "accuracy_vs_shots.png"),
            "scores": score_distributions(report, folder / "score_distributions.png"),
            "reliability": reliability(report, folder / "reliability.png")}
    section = report.get("open_set") or {}
    if any(f.get("auroc") is not None for f in (section.get("scores") or {}).values()):
        made["open_set"] = open_set(report, folder / "open_set.png")
    if report.get("robustness"):
        made["robustness"] = robustness(report, folder / "robustness.png")
    return {k: v.name for k, v in made.items()}
