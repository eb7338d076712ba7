"""report.json / report.md / terminal summary from the protocol's report dict."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from engine.metrics import json_safe  # noqa: F401  (the report's figures as JSON)
from engine.errors import plural


def _cell(text) -> str:
    """A source name or file path as Markdown text: a '|' in it (names may hold one) would shift every column
    after it, so a reader would take one source's figures for another's; '<' started raw HTML in a viewer
    (a source '<img src=x onerror=...>' ran there), and '*', '_', '~', '&' or '[' changed how the rest reads: every
    ASCII punctuation character is escaped (CommonMark takes a backslash before any), a line break is a space."""
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", " ".join(str(text).splitlines()))


def _defined(value) -> bool:
    """A figure to print: not None and finite (an undefined metric is never printed as nan)."""
    return value is not None and math.isfinite(value)


def _pct(value) -> str:
    return f"{100 * value:.1f}%" if _defined(value) else "–"


def _num(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _defined(value) else "–"


def _interval(ci) -> str:
    """A 95% interval as "a–b%", "" when none was recorded (an older report.json)."""
    return f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%" if ci else ""


def _with_ci(section: dict) -> str:
    """"95.0% (95% CI 86.3–98.3%)", the interval left out when none was recorded."""
    ci = _interval(section.get("accuracy_ci95"))
    return _pct(section.get("accuracy")) + (f" (95% CI {ci})" if ci else "")


def accuracy_text(section: dict) -> str:
    """Accuracy in bold with what it rests on: "**95.0%** (57 of 60, 95% CI 86.3–98.3%)", and how many
    answers were ties broken by source order."""
    text = f"**{_pct(section.get('accuracy'))}**"
    if section.get("accuracy_ci95") and section.get("queries"):
        text += (f" ({section.get('correct', round(section['accuracy'] * section['queries']))} of "
                 f"{section['queries']}, 95% CI {_interval(section['accuracy_ci95'])})")
    return text


def ties_text(section: dict) -> str:
    """A sentence when some answers were ties broken by source order ("" when none was)."""
    if not section.get("tied_best"):
        return ""
    return (f". {section['tied_best']} of {section['queries']} originals had two or more sources tied for the best "
            "score, each given to the first listed of them, so per-source figures favour the earlier sources")


def variant_table(report: dict) -> str:
    """One row per variant, best accuracy first; the engine default and the chosen best are marked."""
    default, best = report["resynthesis_default"]["variant"], report["best_variant"]["variant"]
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


def modes_table(modes: dict) -> str:
    lines = ["| mode | accuracy | macro acc. | macro AUROC | generations per new description |",
             "|---|---|---|---|---|"]
    lines += [f"| {mode}{' (default)' if m['default'] else ''} | {_pct(m['accuracy'])} | {_pct(m['macro_accuracy'])} "
              f"| {_num(m['macro_auroc'])} | {m['generations_per_new_description']} |" for mode, m in modes.items()]
    return "\n".join(lines)


def factor_table(means: dict) -> str:
    lines = ["| factor | setting | mean accuracy | mean macro AUROC |", "|---|---|---|---|"]
    for factor, settings in means.items():
        lines += [f"| {factor} | {v} | {_pct(m['accuracy'])} | {_num(m['macro_auroc'])} |" for v, m in settings.items()]
    return "\n".join(lines)


def fewshot_table(fewshot: dict) -> str:
    ks = fewshot["shots"]
    if not ks:
        return f"Few-shot baselines: not measured ({fewshot.get('not_measured') or 'no k could be drawn'})."
    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for method, per_k in fewshot["methods"].items():
        cells = [f"{100 * per_k[str(k)]['mean']:.1f} ± {100 * per_k[str(k)]['std']:.1f}" if str(k) in per_k else "–"
                 for k in ks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_source_table(section: dict) -> str:
    """Per source: its originals, accuracy with its 95% Wilson interval, one-vs-rest AUROC ("–": undefined)."""
    counts, cis = section.get("per_source_queries") or {}, section.get("per_source_ci95") or {}
    lines = ["| source | originals | accuracy | 95% CI | AUROC (one vs rest) |", "|---|---|---|---|---|"]
    for name, acc in section["per_source"].items():
        lines.append(f"| {_cell(name)} | {counts.get(name, '–')} | {_pct(acc)} | {_interval(cis.get(name)) or '–'} | "
                     f"{_num(section['auroc'][name])} |")
    return "\n".join(lines)


def confusion_table(section: dict) -> str:
    names, matrix = section["confusion"]["labels"], section["confusion"]["matrix"]
    lines = ["| true \\ predicted | " + " | ".join(map(_cell, names)) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {_cell(n)} | " + " | ".join(str(v) for v in row) + " |" for n, row in zip(names, matrix)]
    return "\n".join(lines)


def _not_measured(section: dict) -> str:
    return f"not measured ({section.get('not_measured') or 'no reason recorded'})"


def _or_reason(value, section: dict, fmt=None) -> str:
    """A figure, or why it could not be measured (never a stand-in number)."""
    if value is None:
        return _not_measured(section)
    return (fmt or _num)(value)


def _folds_text(info: dict | None) -> str:
    if not info:
        return "cross-fitted"
    if info["by"] == "description":
        return f"cross-fitted on two folds of descriptions ({info['descriptions']} descriptions)"
    return (f"cross-fitted on two folds of images stratified by source, seed {info['seed']}, because "
            f"{info['why']}; {info['caveat']}")


LITERATURE_HEAD = "OSCR | TNR@TPR95 | CCR@FPR5"


def literature_cells(figures: dict) -> str:
    """OSCR, TNR at 95% TPR and CCR at 5% FPR as table cells (– where not measured)."""
    return (f"{_num(figures.get('oscr'))} | {_pct(figures.get('tnr_at_tpr95'))} | "
            f"{_pct(figures.get('ccr_at_fpr5'))}")


def open_set_table(open_set: dict) -> str:
    lines = ["| left-out source (unknowns / knowns) | AUROC unknown vs known | unknowns rejected | "
             f"known false-reject | known accuracy (accepted) | {LITERATURE_HEAD} |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in open_set["per_source"].items():
        if v.get("auroc") is None:
            lines.append(f"| {_cell(name)} | {_not_measured(v)} | – | – | – | – | – | – |")
            continue
        counts = f" ({v['unknowns']} / {v['knowns']})" if "unknowns" in v else ""
        lines.append(f"| {_cell(name)}{counts} | {_num(v['auroc'])} | {_pct(v['unknown_rejected'])} | "
                     f"{_pct(v['known_false_reject'])} | {_pct(v['known_accuracy_accepted'])} | "
                     f"{literature_cells(v)} |")
    if open_set.get("auroc") is None:
        lines.append(f"| **mean / pooled** | {_not_measured(open_set)} | – | – | – | – | – | – |")
    else:
        lines.append(f"| **mean / pooled** | {_num(open_set['auroc'])} / {_num(open_set.get('pooled_auroc'))} | "
                     f"{_pct(open_set['unknown_rejected'])} | {_pct(open_set['known_false_reject'])} | "
                     f"{_pct(open_set['known_accuracy_accepted'])} | {literature_cells(open_set)} (means) |")
    return "\n".join(lines)


LITERATURE_NOTE = ("OSCR: area under correct classification of knowns against false positives on unknowns "
                   "(Dhamija et al. 2018; at most the known accuracy). TNR@TPR95: unknowns rejected at the "
                   "threshold accepting 95% of knowns. CCR@FPR5: knowns correctly classified and accepted at the "
                   "threshold accepting 5% of unknowns. Each per left-out source on the cross-fitted decision "
                   "values, then averaged like the AUROC.")


def open_set_scores_table(open_set: dict) -> str:
    """Every open-set score side by side: the evidence for the default."""
    frr = _pct(open_set["target_false_reject"])
    lines = [f"| score | threshold | mean AUROC | pooled AUROC | unknowns rejected at {frr} known false reject | "
             f"cross-fitted: unknowns rejected / known false reject | mean {LITERATURE_HEAD} | |",
             "|---|---|---|---|---|---|---|---|---|"]
    definitions = open_set.get("score_definitions", {})
    for name, f in open_set.get("scores", {}).items():
        marks = " ".join(m for m, on in (("**default**", name == open_set.get("default_score")),
                                         ("**best measured**", name == open_set.get("best_measured_score"))) if on)
        kind = f.get("threshold", "–")
        if f.get("auroc") is None:
            lines.append(f"| {name} | {kind} | {_not_measured(f)} | – | – | – | – | – | – | {marks} |")
            continue
        lines.append(f"| {name} | {kind} | {_num(f['auroc'])} | {_num(f.get('pooled_auroc'))} | "
                     f"{_pct(f['unknown_rejected_at_frr'])} | {_pct(f['unknown_rejected'])} / "
                     f"{_pct(f['known_false_reject'])} | {literature_cells(f)} | {marks} |")
    lines += ["", *[f"- **{n}**: {d}" for n, d in definitions.items() if n in open_set.get("scores", {})],
              "", LITERATURE_NOTE]
    return "\n".join(lines)


def open_set_markdown(o: dict) -> list[str]:
    headline = o.get("headline_score") or "–"
    parts = [f"## Unknown sources (each source left out in turn; thresholds at {_pct(o['target_false_reject'])} "
             f"false reject, {_folds_text(o.get('folds'))})"]
    if o.get("auroc") is None and not o.get("per_source"):
        return parts + [f"Unknown-source rejection: {_not_measured(o)}."]
    parts += [f"Per left-out source, score **{headline}**:", open_set_table(o)]
    x = o.get("at_exact_false_reject")
    if x:
        here = f" (here {_pct(x['known_rejected'])})" if x.get("known_rejected") is not None else ""
        parts.append(f"With one shared offset so that at most {_pct(o['target_false_reject'])}{here} of known queries "
                     f"are rejected: known accuracy {_pct(x['known_accuracy_accepted'])}, unknowns rejected "
                     f"{_pct(x['unknown_rejected'])}.")
    if o.get("scores"):
        parts += ["Open-set scores compared (same folds, same left-out sources):", open_set_scores_table(o)]
        best = o.get("best_measured_score")
        if best and best != o.get("default_score"):
            parts.append(f"On this dataset **{best}** measured best; the default stays "
                         f"**{o.get('default_score')}** until the evidence holds across datasets.")
    return parts


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


def skipped_text(d: dict, quote=str) -> str:
    """How many originals were left out, and why ("" when none was); `quote`: how an example path is written
    (`_cell` in the Markdown)."""
    if not d.get("skipped"):
        return ""
    examples = d.get("skipped_examples", {})
    reasons = "; ".join(f"{n} because {reason} (e.g. {', '.join(map(quote, examples.get(reason, [])))})"
                        for reason, n in d.get("skipped_by_reason", {}).items())
    return f"skipped {plural(d['skipped'], 'original')} that cannot be scored: {reasons}"


def default_text(e: dict | None) -> str:
    """The engine's default, named once, from the settings the report recorded (engine.options)."""
    if not e or "mode" not in e:
        return "engine default: not measured"
    asked = e.get("references_option", e["references"])  # the flag's value; the data may offer fewer
    capped = f" (here up to {e['references']} per source)" if asked != e["references"] else ""
    return (f"engine default (`resynth attribute` with no option: --mode {e['mode']}, --aggregation "
            f"{e['aggregation']}, --references {asked}{capped}, --neighbours {e['neighbours']})")


def real_text(r: dict) -> str:
    """One line on the real images (engine.evaluation.realimages)."""
    if "not_measured" in r:
        return f"real images ({r['real_images']}): not measured ({r['not_measured']})"
    return (f"real images ({r['real_images']}, {r['folds']}-fold cross-fitted \"real\" rule): false-positive rate "
            f"{_pct(r['false_positive_rate'])} (real photos not called real), generated originals called real "
            f"{_pct(r['generated_called_real'])} (target {_pct(r['target_generated_called_real'])}), AUROC "
            f"{_num(r['auroc'])}")


def _sources_text(d: dict) -> str:
    """"N sources": those that had originals (of M candidates, when some had none)."""
    per = d.get("originals_per_source") or {}
    having = sum(1 for count in per.values() if count) if per else len(d["sources"])
    return plural(having, "source") + (f" (of {plural(len(d['sources']), 'candidate source')})"
                                       if having != len(d["sources"]) else "")


def selection_caveat(report: dict) -> str:
    """The best variant was picked on the very originals it is measured on: say so, and what to quote."""
    n = len(report.get("variants") or [])
    return (f"Picked as the best of {plural(n, 'variant')} on these same originals, so its figures are "
            "optimistic (a maximum over the grid, not a held-out measurement): quote the default's, or confirm "
            "the variant on other data.")


def markdown(report: dict) -> str:
    d, r, b, c = report["dataset"], report["resynthesis_default"], report["best_variant"], report["calibration"]
    e = report.get("engine_default")
    skipped = skipped_text(d, _cell)
    parts = [
        "# resynth evaluation",
        f"{d['originals']} originals of {_sources_text(d)} ({plural(d['descriptions'], 'description')}), "
        f"{d['resyntheses']} resyntheses (up to K={d['max_per_source']} per source and original); every original "
        f"attributed leave-one-out. Feature layers: {', '.join(d['layers'])} (primary: {d['primary_layer']}). "
        f"Chance: {_pct(d['chance'])}." + (f" {skipped[0].upper()}{skipped[1:]}." if skipped else ""),
    ]
    if e and "mode" in e:
        parts += [f"## {default_text(e)[0].upper()}{default_text(e)[1:]}",
                  f"accuracy {accuracy_text(e)}, macro accuracy {_pct(e['macro_accuracy'])}, top-3 "
                  f"{_pct(e['top3_accuracy'])}, macro one-vs-rest AUROC {_num(e['macro_auroc'])}{ties_text(e)}"]
    parts += [
        f"## Resynthesis mode at the default aggregation and K ({r['variant']})",
        "The variant grid's reference row; the few-shot, unknown-source, calibration and robustness figures "
        "below score with it.",
        f"accuracy {accuracy_text(r)}, macro accuracy {_pct(r['macro_accuracy'])}, top-3 "
        f"{_pct(r['top3_accuracy'])}, macro one-vs-rest AUROC {_num(r['macro_auroc'])}{ties_text(r)}",
        per_source_table(r), "", confusion_table(r),
        f"## Best measured variant: {b['variant']}",
        f"accuracy {accuracy_text(b)}, macro accuracy {_pct(b['macro_accuracy'])}, macro AUROC "
        f"{_num(b['macro_auroc'])}. {selection_caveat(report)}",
        "## Modes (engine defaults)", modes_table(report.get("modes") or {}),
        "## Variants", variant_table(report),
        f"Best without original references (resynthesis only, as `resynth attribute` runs by default; "
        f"`--original-refs N` adds labelled originals as references): **{report['best_resynthesis_only']}**.",
        "Mean over all other factors (resynthesis only):", factor_table(report["factor_means"]),
        "## Resynthesis vs few-shot baselines (accuracy %, mean ± std over draws; paired test splits)",
        fewshot_table(report["fewshot"]),
    ]
    if report.get("open_set"):
        parts += open_set_markdown(report["open_set"])
    if report.get("real_images"):
        parts += ["## Real (camera) images: how often one is mistaken for a generated image",
                  real_text(report["real_images"])]
    fitted_all = c.get("fitted_temperature_all")
    parts += ["## Calibration (temperature-scaled softmax over per-source scores)",
              f"ECE {_num(c['ece_default'])} at the default T={c['default_temperature']:g}; "
              f"{_or_reason(c['ece_calibrated'], c)} with T fitted on the other fold "
              f"({_folds_text(c.get('folds'))}; T on all data: "
              f"{'–' if fitted_all is None else f'{fitted_all:.3g}'}). "
              f"NLL {_num(c['nll_default'])} → {_or_reason(c['nll_calibrated'], c)}."]
    if report.get("robustness"):
        parts += ["## Robustness (queries post-processed; references clean)", robustness_table(report["robustness"])]
    if report.get("plots"):
        parts += ["## Plots", *[f"![{k}]({v})" for k, v in report["plots"].items()]]
    return "\n\n".join(parts) + "\n"


def summary(report: dict) -> str:
    """The few lines printed on the terminal: the engine's default is named once, on the first figures line."""
    r, b, d = report["resynthesis_default"], report["best_variant"], report["dataset"]
    e = report.get("engine_default")
    lines = [f"{d['originals']} originals, {_sources_text(d)}, {d['resyntheses']} resyntheses "
             f"(chance {_pct(d['chance'])})"]
    if d.get("skipped"):
        lines.append(skipped_text(d))
    if e and "mode" in e:
        lines.append(f"{default_text(e)}: accuracy {_with_ci(e)}, macro {_pct(e['macro_accuracy'])}, "
                     f"top-3 {_pct(e['top3_accuracy'])}, macro AUROC {_num(e['macro_auroc'])}")
    lines += [f"resynthesis mode, same aggregation and K ({r['variant']}; the figures below use it): accuracy "
              f"{_with_ci(r)}, macro {_pct(r['macro_accuracy'])}, top-3 {_pct(r['top3_accuracy'])}, "
              f"macro AUROC {_num(r['macro_auroc'])}",
              f"best variant {b['variant']} (picked on these originals: optimistic): accuracy {_pct(b['accuracy'])}, "
              f"macro AUROC {_num(b['macro_auroc'])}"]
    if report.get("modes"):
        lines.append("other modes: " + "; ".join(
            f"{mode} {_pct(m['accuracy'])}, {plural(m['generations_per_new_description'], 'generation')} per new "
            "description"
            for mode, m in report["modes"].items() if not m["default"]))
    fewshot = report["fewshot"]
    if not fewshot["shots"] and fewshot.get("not_measured"):
        lines.append(f"few-shot baselines: not measured ({fewshot['not_measured']})")
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
        x = o.get("at_exact_false_reject")
        if o.get("auroc") is None:
            lines.append(f"unknown source: AUROC {_not_measured(o)}")
        else:
            line = (f"unknown source ({o.get('headline_score') or '–'}): AUROC {_num(o['auroc'])}; at most "
                    f"{_pct(o['target_false_reject'])} known false reject: known accuracy "
                    f"{_pct(x['known_accuracy_accepted'])}, unknowns rejected {_pct(x['unknown_rejected'])}")
            line += (f"; OSCR {_num(o.get('oscr'))}, TNR@TPR95 {_pct(o.get('tnr_at_tpr95'))}, "
                     f"CCR@FPR5 {_pct(o.get('ccr_at_fpr5'))}")
            best = o.get("best_measured_score")
            if best and best != o.get("headline_score"):
                line += f"; best measured score {best}: AUROC {_num(o['scores'][best]['auroc'])}"
            lines.append(line)
    if report.get("real_images"):
        lines.append(real_text(report["real_images"]))
    c = report["calibration"]
    lines.append(f"calibration: ECE {_num(c['ece_default'])} (default T) -> {_or_reason(c['ece_calibrated'], c)} "
                 f"(fitted T)")
    if report.get("robustness"):
        worst = min(report["robustness"]["conditions"].items(), key=lambda kv: kv[1]["resynthesis_all"])
        lines.append(f"robustness: worst condition {worst[0]}: resynthesis {_pct(worst[1]['resynthesis_all'])}")
    return "\n".join(lines)


def write(report: dict, folder: Path) -> tuple[Path, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "report.json", folder / "report.md"
    from engine.errors import writing

    with writing(json_path):
        json_path.write_text(json.dumps(json_safe(report), indent=2))
    with writing(md_path):
        md_path.write_text(markdown(report))
    return json_path, md_path
