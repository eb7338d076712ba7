"""The README and docs/*.md say only what is true of the product: every relative link (and its #anchor)
resolves, every `resynth COMMAND` they show is a command, every `--flag` written after one is that
command's flag, and every other `--flag` in their code is some resynth command's. Parsed in process from
the markdown (fenced, indented and inline code), with the real parsers: no subprocess, well under a second."""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FOREIGN_FLAGS = {"--quick"}  # measurements.md: `bench_gpu.py --size real --quick`, named without scripts/
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def _code(text: str) -> list[tuple[int, str]]:
    """(line number, code) for every line of a fenced or indented block (continuations joined) and every
    inline code span of prose."""
    out: list[tuple[int, str]] = []
    fenced, pending, start, blank_before = False, "", 0, True
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced, blank_before = not fenced, False
            continue
        indented = not fenced and line.startswith("    ") and (blank_before or pending) and line.strip()
        if fenced or indented:
            if not pending:
                start = number
            pending += line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            out.append((start, pending))
            pending = ""
            continue
        blank_before = not line.strip()
        out.extend((number, span) for span in _INLINE.findall(line))
    return out


def _parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every parser of `resynth`, by its command path: () for the top, ("source", "add"), ..."""
    from engine.cli import build_parser

    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}

    def walk(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
        found[path] = parser
        for action in parser._actions:  # argparse keeps its subcommands nowhere public
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk((*path, name), child)

    walk((), build_parser())
    return found


def _commands(code: str) -> list[list[str]]:
    """The argument lists of the `resynth ...` invocations in one line of code (after `resynth`)."""
    try:
        words = shlex.split(code, comments=True)
    except ValueError:  # an unbalanced quote in prose
        words = code.split()
    commands: list[list[str]] = []
    current: list[str] | None = None
    for word in (w.strip("[]") for w in words):  # `[--ray ADDRESS]`: an optional part
        if word == "resynth" or word.endswith("bin/resynth"):
            current = []
            commands.append(current)
        elif word in ("|", "&&", ";"):
            current = None
        elif current is not None:
            current.append(word)
    return commands


def _flags(words: list[str]) -> list[str]:
    flags = []
    for word in words:
        for part in word.split("|"):
            name = part.split("=", 1)[0]
            if re.fullmatch(r"--[a-z][a-z0-9-]*", name):
                flags.append(name)
    return flags


PARSERS = _parsers()
EVERY_FLAG = {flag for parser in PARSERS.values() for flag in parser._option_string_actions}


def _where(page: Path | str, number: int) -> str:
    return page if isinstance(page, str) else f"{page.relative_to(REPO)}:{number}"


def _help_examples() -> list[tuple[Path | str, int, str]]:
    """The `resynth ...` lines of every parser's own help (`source add --help` ends with examples)."""
    return [(f"resynth {' '.join(path)} --help", 0, line.strip())
            for path, parser in PARSERS.items() for line in f"{parser.description}\n{parser.epilog}".splitlines()
            if line.strip().startswith("resynth ")]


def test_every_resynth_command_the_docs_and_the_help_show_parses():
    wrong = []
    shown: list[tuple[Path | str, int, str]] = [
        (page, n, code) for page in PAGES for n, code in _code(page.read_text())]
    for page, number, code in shown + _help_examples():
        for words in _commands(code):
            path: tuple[str, ...] = ()
            rest = list(words)
            while rest and (*path, rest[0]) in PARSERS:
                path = (*path, rest.pop(0))
            if not path and rest and not rest[0].startswith("-") and re.fullmatch(r"[a-z][a-z-]*", rest[0]):
                wrong.append(f"{_where(page, number)}: `resynth {rest[0]}` is no command")
                continue
            known = PARSERS[path]._option_string_actions
            for flag in _flags(rest):
                if flag not in known:
                    wrong.append(f"{_where(page, number)}: `resynth {' '.join(path)}` has no {flag}")
    assert not wrong, "\n".join(wrong)


def test_every_other_flag_in_the_docs_code_exists():
    """A flag written after a script (`python scripts/x.py --flag`) is in that script's source; any other
    is some resynth command's."""
    wrong = []
    for page in PAGES:
        for number, code in _code(page.read_text()):
            if "pip " in code or "pytest" in code or code.lstrip().startswith(("curl", "weed", "ray ")):
                continue
            script = None
            for word in (w.strip("[]") for w in code.split()):
                if word == "resynth" or word.endswith("bin/resynth") or word in ("&&", "|", ";", "#"):
                    script = None
                if re.fullmatch(r"scripts/\w+\.py", word):
                    script = REPO / word
                    if not script.exists():
                        wrong.append(f"{_where(page, number)}: {word} does not exist")
                        script = None
                for flag in _flags([word]):
                    if script is not None:
                        if f'"{flag}"' not in script.read_text():
                            wrong.append(f"{_where(page, number)}: {script.name} has no {flag}")
                    elif flag not in EVERY_FLAG and flag not in FOREIGN_FLAGS:
                        wrong.append(f"{_where(page, number)}: {flag} is no resynth flag")
    assert not wrong, "\n".join(wrong)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a page (lower case, punctuation dropped, spaces to '-')."""
    anchors: set[str] = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    wrong = []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        for target in _LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            resolved = (page.parent / file).resolve() if file else page
            if not resolved.exists():
                wrong.append(f"{_where(page, number)}: {target} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                wrong.append(f"{_where(page, number)}: {target}: no heading #{anchor}")
    assert not wrong, "\n".join(wrong)


MODULES = {path.name for top in ("engine", "index", "scripts", "tests") for path in (REPO / top).rglob("*.py")}


def test_files_and_scripts_the_docs_name_exist():
    """`tests/...py`, `scripts/...py`, `engine/...`, `index/...` named in code, and a `name.py` named alone,
    are in the tree."""
    wrong = []
    for page in PAGES:
        for number, code in _code(page.read_text()):
            for name in re.findall(r"(?<![\w/.])((?:tests|scripts|engine|index|docs)/[\w/.-]*\w)", code):
                if not (REPO / name).exists() and not (REPO / (name + ".py")).exists():
                    wrong.append(f"{_where(page, number)}: {name} does not exist")
            if re.fullmatch(r"\w+\.py", code) and code not in MODULES:  # `bench_serve.py`, named alone
                wrong.append(f"{_where(page, number)}: no {code} in the tree")
    assert not wrong, "\n".join(wrong)


def test_a_typo_names_the_nearest_command_or_flag(tmp_path, capsys):
    """A newcomer's typo is answered with what they meant, in the one usage line; a stray word is not."""
    from tests.helpers import run_cli

    for argv, hint in ((("atribute", "x.png"), "did you mean 'attribute'?"),
                       (("source", "ad", "x"), "did you mean 'add'?"),
                       (("source", "add", "x", "y", "--stepz", "3"), "did you mean --steps?"),
                       (("attribute", "x.png", "--no-adaptve"), "did you mean --no-adaptive?"),
                       (("attribute", "x.png", "--bogus"), None)):
        with pytest.raises(SystemExit) as stop:
            run_cli(*argv)
        assert stop.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert (hint in last) if hint else "did you mean" not in last, (argv, last)
    # a --queries row names its line, and where a relative image path is read from
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"image": "gone.png", "prompt": "a cat"}\n')
    assert run_cli("attribute", "--queries", queries, "--store", tmp_path / "none") == 2
    err = capsys.readouterr().err
    assert f"{queries}:1: image not found: {tmp_path / 'gone.png'}" in err and "queries file's folder" in err, err


def test_the_readme_shows_the_options_and_their_defaults_as_they_are():
    import engine

    text = " ".join((REPO / "README.md").read_text().split())
    shown = re.search(r"`engine\.Options\(([^`]*)\)`", text)
    assert shown, "README: the engine.Options(...) line is gone"
    assert shown.group(1).replace('"', "'").replace(" ", "") == repr(engine.Options())[len("Options("):-1].replace(
        " ", ""), "README's engine.Options(...) differs from repr(engine.Options())"


def test_every_environment_variable_the_docs_name_is_read_somewhere():
    named = {name for page in PAGES for name in re.findall(r"\bRESYNTH_[A-Z0-9_]*[A-Z0-9]", page.read_text())}
    code = "".join(path.read_text() for top in ("engine", "index", "tests") for path in (REPO / top).rglob("*.py"))
    unread = sorted(name for name in named if name not in code)
    assert not unread, f"the docs name variables no code reads: {unread}"


def test_every_flag_a_help_text_names_exists():
    """A flag renamed or removed leaves no stale mention in another command's --help."""
    stale = set()
    for path, parser in PARSERS.items():
        texts = [parser.description or "", parser.epilog or ""]
        texts += [action.help for action in parser._actions if isinstance(action.help, str)]
        for text in texts:
            stale |= {(" ".join(path), flag) for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)
                      if flag not in EVERY_FLAG}
    assert not stale, f"--help texts name flags no command has: {sorted(stale)}"
