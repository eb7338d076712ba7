"""The text answer of `resynth attribute`: per query the verdict with the evidence that decided it, the
ranking, what was not scored and why, and the caveats a reader needs (the --json answer is the report)."""
from __future__ import annotations

from engine.attribute import Attribution, Report
from engine.errors import plural
from engine.paths import shown


def verdict_line(r: Attribution) -> str:
    """The verdict with its evidence: the score against the threshold that decided it, and on how many
    references, so that "unknown source" beside a high probability explains itself."""
    ev = r.evidence or {}
    if r.verdict == "none" or r.predicted is None:
        return "no source could be scored"
    refs = plural(ev["references"], "reference") if "references" in ev else None
    test: str | None
    # a "real" verdict keeps the known/unknown decision apart (evidence.open_set_verdict): the sign is its
    rejected = (ev.get("open_set_verdict") if r.verdict == "real" else r.verdict) == "unknown"
    if "open_set_score" in ev:  # decided by the feature-based open-set score, not the best similarity
        sign = "<" if rejected else ">="
        test = f"{ev['open_set_score']} {ev['value']:.2f} {sign} threshold {ev['threshold']:.2f}"
    elif "threshold" in ev:  # similarities crowd near 1: 4 decimals, as the ranking shows them
        sign = "<" if rejected else ">="
        test = f"score {ev['score']:.4f} {sign} threshold {ev['threshold']:.4f}"
    else:
        test = f"score {ev['score']:.4f}" if "score" in ev else None
    evidence = ", ".join(part for part in (test, refs) if part)
    if r.verdict == "unknown":
        return f"unknown source (closest: {r.predicted}, {evidence})"
    if r.verdict == "known":
        return f"{r.predicted} (known source: {evidence})"
    if r.verdict == "real" and "real" in ev:  # nearer the real references than any generated image
        real = ev["real"]
        return (f"real: no sign of generation (value {real['value']:.3f} > threshold {real['threshold']:.3f}; "
                f"closest source {r.predicted}, {evidence})")
    why = ev.get("why", "no acceptance threshold")
    return f"{r.predicted} (uncalibrated: {why}; {evidence})"


def _name(query: object) -> str:
    """The query's name escaped as `shown` escapes a path, but whole: `shown` cuts a path past 160 characters in the
    middle ("/data/...x.png"), and an answer that does not name its file cannot be told from the others."""
    text = str(query)
    if text.isprintable():
        return text
    return "".join(shown(c) if not c.isprintable() else c for c in text)


def text_answer(report: Report) -> str:
    """What `resynth attribute` prints without --json."""
    lines = []
    for r in report.results:
        margin = f", margin {r.margin:.4f}" if r.margin is not None else ""
        lines.append(f"{_name(r.query)}: {verdict_line(r)}{margin}  "  # a right-to-left mark in a name: escaped
                     + (f"[description from {r.description_from}: {r.description!r}]" if r.description_from != "none"
                        else "[no description: nearest stored references only]"))
        lines += [f"  {s.source:24} {s.score:.4f}  p={s.probability:.3f}  ({plural(s.resyntheses, 'reference')})"
                  for s in r.scores]
        unscored = [m for m in r.missing if m not in r.failed]
        if unscored:
            why = ("none among the nearest stored references" if (r.evidence or {}).get("mode") == "dataset"
                   else "no resynthesis of this description")
            lines.append(f"  not scored ({why}): {', '.join(unscored)}")
        for name, reason in r.failed.items():
            lines.append(f"  not scored ({name} failed): {reason}")
        if (r.evidence or {}).get("provenance", {}).get("conclusion"):  # the file's own claim, beside the ranking
            lines.append(f"  provenance: {r.evidence['provenance']['conclusion']}")
        lines += [f"  note: {note}" for note in r.notes]
    uncalibrated = [r for r in report.results if r.scores and not r.calibrated]
    if uncalibrated:  # why: none fitted, stale, or fitted for another mode or aggregation
        why = (uncalibrated[0].evidence or {}).get("why") or "no current calibration: `resynth calibrate`"
        lines.append(f"p: a softmax of the scores, not a calibrated probability ({why})")
    lines.append(f"resyntheses: {report.cached} cached, {report.generated} generated")
    if report.cost is not None:
        from engine.jobs import cost_line

        lines.append(cost_line(report.cost))
    return "\n".join(lines)
