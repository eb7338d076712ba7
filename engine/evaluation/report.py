"""report.json / report.md / terminal summary from the protocol's report dict."""
from __future__ import annotations

import json
import math
from pathlib import Path


def json_safe(value):
    """nan/inf become None (JSON has no nan); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _num(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def variant_table(report: dict) -> str:
    """One row per variant, best accuracy first; the engine default and the chosen best are marked."""
    default, best = report["engine_default"]["variant"], report["best_variant"]["variant"]
    rows = sorted(report["variants"], key=lambda r: (-r["accuracy"], -(r["macro_auroc"] or 0), r["variant"]))
    lines = ["| layer | distance | aggregation | K | + original refs | accuracy | macro acc. | top-3 | macro AUROC | |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " ".join(m for m, on in (("**default**", r["variant"] == default), ("**best**", r["variant"] == best))
                        if on)
        lines.append(f"| {r['layer']} | {r['distance']} | {r['aggregation']} | {r['per_source']} | "
                     f"{'yes (leave-one-out)' if r['fewshot'] else 'no'} | {_pct(r['accuracy'])} | "
                     f"{_pct(r['macro_accuracy'])} | {_pct(r['top3_accuracy'])} | {_num(r['macro_auroc'])} | {mark} |")
    return "\n".join(lines)


def factor_table(means: dict) -> str:
    lines = ["| factor | setting | mean accuracy | mean macro AUROC |", "|---|---|---|---|"]
    for factor, settings in means.items():
        lines += [f"| {factor} | {v} | {_pct(m['accuracy'])} | {_num(m['macro_auroc'])} |" for v, m in settings.items()]
    return "\n".join(lines)


def fewshot_table(fewshot: dict) -> str:
    ks = fewshot["shots"]
    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for method, per_k in fewshot["methods"].items():
        cells = [f"{100 * per_k[str(k)]['mean']:.1f} ± {100 * per_k[str(k)]['std']:.1f}" if str(k) in per_k else "–"
                 for k in ks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_source_table(section: dict) -> str:
    lines = ["| source | accuracy | AUROC (one vs rest) |", "|---|---|---|"]
    for name, acc in section["per_source"].items():
        lines.append(f"| {name} | {_pct(acc)} | {_num(section['auroc'][name])} |")
    return "\n".join(lines)


def confusion_table(section: dict) -> str:
    names, matrix = section["confusion"]["labels"], section["confusion"]["matrix"]
    lines = ["| true \\ predicted | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {n} | " + " | ".join(str(v) for v in row) + " |" for n, row in zip(names, matrix)]
    return "\n".join(lines)


def open_set_table(open_set: dict) -> str:
    lines = ["| left-out source | AUROC unknown vs known | unknowns rejected | known false-reject | "
             "known accuracy (accepted) |", "|---|---|---|---|---|"]
    for name, v in open_set["per_source"].items():
        lines.append(f"| {name} | {_num(v['auroc'])} | {_pct(v['unknown_rejected'])} | "
                     f"{_pct(v['known_false_reject'])} | {_pct(v['known_accuracy_accepted'])} |")
    lines.append(f"| **mean / pooled** | {_num(open_set['auroc'])} / {_num(open_set['pooled_auroc'])} | "
                 f"{_pct(open_set['unknown_rejected'])} | {_pct(open_set['known_false_reject'])} | "
                 f"{_pct(open_set['known_accuracy_accepted'])} |")
    return "\n".join(lines)


def robustness_table(robust: dict) -> str:
    conditions = robust["conditions"]
    methods = list(next((c["fewshot"] for c in conditions.values() if c.get("fewshot")), {}))
    lines = ["| query post-processing | resynthesis (all originals) | " +
             " | ".join(f"{m} (k={robust['shots']})" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for name, c in conditions.items():
        cells = [_pct(c.get("fewshot", {}).get(m)) for m in methods]
        lines.append(f"| {name} | {_pct(c['resynthesis_all'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    d, e, b, c = report["dataset"], report["engine_default"], report["best_variant"], report["calibration"]
    parts = [
        "# resynth evaluation",
        f"{d['originals']} originals of {len(d['sources'])} sources ({d['descriptions']} descriptions), "
        f"{d['resyntheses']} resyntheses (up to K={d['max_per_source']} per source and original); every original "
        f"attributed leave-one-out. Feature layers: {', '.join(d['layers'])} (primary: {d['primary_layer']}). "
        f"Chance: {_pct(d['chance'])}.",
        f"## Engine default ({e['variant']})",
        f"accuracy **{_pct(e['accuracy'])}**, macro accuracy {_pct(e['macro_accuracy'])}, top-3 "
        f"{_pct(e['top3_accuracy'])}, macro one-vs-rest AUROC {_num(e['macro_auroc'])}",
        per_source_table(e), "", confusion_table(e),
        f"## Best measured variant: {b['variant']}",
        f"accuracy **{_pct(b['accuracy'])}**, macro accuracy {_pct(b['macro_accuracy'])}, macro AUROC "
        f"{_num(b['macro_auroc'])}",
        "## Variants", variant_table(report),
        f"Best without original references (what `resynth attribute` can run): "
        f"**{report['best_resynthesis_only']}**.",
        "Mean over all other factors (resynthesis only):", factor_table(report["factor_means"]),
        "## Resynthesis vs few-shot baselines (accuracy %, mean ± std over draws; paired test splits)",
        fewshot_table(report["fewshot"]),
    ]
    if report.get("open_set"):
        o = report["open_set"]
        x = o["at_exact_false_reject"]
        parts += [f"## Unknown sources (each source left out in turn; per-source thresholds at "
                  f"{_pct(o['target_false_reject'])} false reject, cross-fitted over descriptions)", open_set_table(o),
                  f"With one shared offset so that exactly {_pct(o['target_false_reject'])} of known queries are "
                  f"rejected: known accuracy {_pct(x['known_accuracy_accepted'])}, unknowns rejected "
                  f"{_pct(x['unknown_rejected'])}."]
    parts += ["## Calibration (temperature-scaled softmax over per-source scores)",
              f"ECE {_num(c['ece_default'])} at the default T={c['default_temperature']:g}; "
              f"{_num(c['ece_calibrated'])} with T fitted on held-out descriptions (T on all data: "
              f"{c['fitted_temperature_all']:.3g}). NLL {_num(c['nll_default'])} → {_num(c['nll_calibrated'])}."]
    if report.get("robustness"):
        parts += ["## Robustness (queries post-processed; references clean)", robustness_table(report["robustness"])]
    if report.get("plots"):
        parts += ["## Plots", *[f"![{k}]({v})" for k, v in report["plots"].items()]]
    return "\n\n".join(parts) + "\n"


def summary(report: dict) -> str:
    """The few lines printed on the terminal."""
    e, b, d = report["engine_default"], report["best_variant"], report["dataset"]
    lines = [f"{d['originals']} originals, {len(d['sources'])} sources, {d['resyntheses']} resyntheses "
             f"(chance {_pct(d['chance'])})",
             f"engine default {e['variant']}: accuracy {_pct(e['accuracy'])}, macro {_pct(e['macro_accuracy'])}, "
             f"top-3 {_pct(e['top3_accuracy'])}, macro AUROC {_num(e['macro_auroc'])}",
             f"best variant   {b['variant']}: accuracy {_pct(b['accuracy'])}, macro AUROC {_num(b['macro_auroc'])}"]
    fewshot = report["fewshot"]
    if fewshot["shots"]:
        k = max(fewshot["shots"])
        best_baseline = max(((m, v[str(k)]["mean"]) for m, v in fewshot["methods"].items()
                             if not m.startswith("resynthesis") and str(k) in v), key=lambda x: x[1])
        lines.append(f"at k={k} labelled originals per source: resynthesis "
                     f"{_pct(fewshot['methods']['resynthesis'][str(k)]['mean'])}, with those as references "
                     f"{_pct(fewshot['methods']['resynthesis+refs'][str(k)]['mean'])}, best baseline "
                     f"{best_baseline[0]} {_pct(best_baseline[1])}")
    if report.get("open_set"):
        o = report["open_set"]
        x = o["at_exact_false_reject"]
        lines.append(f"unknown source: AUROC {_num(o['auroc'])}; at exactly {_pct(o['target_false_reject'])} known "
                     f"false reject: known accuracy {_pct(x['known_accuracy_accepted'])}, unknowns rejected "
                     f"{_pct(x['unknown_rejected'])}")
    c = report["calibration"]
    lines.append(f"calibration: ECE {_num(c['ece_default'])} (default T) -> {_num(c['ece_calibrated'])} (fitted T)")
    if report.get("robustness"):
        worst = min(report["robustness"]["conditions"].items(), key=lambda kv: kv[1]["resynthesis_all"])
        lines.append(f"robustness: worst condition {worst[0]}: resynthesis {_pct(worst[1]['resynthesis_all'])}")
    return "\n".join(lines)


def write(report: dict, folder: Path) -> tuple[Path, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "report.json", folder / "report.md"
    json_path.write_text(json.dumps(json_safe(report), indent=2))
    md_path.write_text(markdown(report))
    return json_path, md_path
