"""report.md as a Markdown viewer shows it: source names and file paths are text, whatever they hold."""
from __future__ import annotations

import pytest

from engine.evaluation import report

markdown_it = pytest.importorskip("markdown_it")
NAMES = ["<img src=x onerror=alert(1)>", "a*b*c", "x|y", "[link](javascript:alert(2))", "`tick`", "back\\slash",
         "_tiny_", "__bold__", "a&amp;b", "&lt;b&gt;", "~~strike~~", "# h", "1. list"]


def rendered(text: str) -> str:
    return markdown_it.MarkdownIt("commonmark").enable("table").enable("strikethrough").render(text)


def cells(html: str) -> list[str]:
    """The text of each first-column cell of a rendered table's body, entities read back."""
    import html as html_lib
    import re

    return [html_lib.unescape(c) for c in re.findall(r"<tr>\s*<td>(.*?)</td>", html, re.S)]


def test_source_names_are_text_in_the_tables():
    """A name's '<' opened raw HTML in the viewer (an <img onerror> ran), '*' and '[' made emphasis and links:
    only '|' was escaped."""
    section = {"per_source": {n: 0.5 for n in NAMES}, "auroc": {n: 0.7 for n in NAMES},
               "confusion": {"labels": NAMES, "matrix": [[1] * len(NAMES) for _ in NAMES]}}
    for table in (report.per_source_table(section), report.confusion_table(section)):
        html = rendered(table)
        assert "<img" not in html and "<em>" not in html and "<a " not in html and "<code>" not in html
        assert "<strong>" not in html and "<s>" not in html
        assert cells(html) == NAMES


def test_skipped_paths_are_text_in_the_markdown_and_plain_on_the_terminal():
    d = {"skipped": 1, "skipped_by_reason": {"no resyntheses": 1},
         "skipped_examples": {"no resyntheses": ["<script>alert(1)</script>.png"]}}
    html = rendered(report.skipped_text(d, report._cell))
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;.png" in html
    assert "(e.g. <script>alert(1)</script>.png)" in report.skipped_text(d)  # the terminal shows it as it is


def test_a_line_break_in_a_path_starts_nothing():
    d = {"skipped": 1, "skipped_by_reason": {"no resyntheses": 1},
         "skipped_examples": {"no resyntheses": ["x.png\n# Heading injected"]}}
    html = rendered(report.skipped_text(d, report._cell))
    assert "<h1>" not in html and "x.png # Heading injected" in html
