"""`resynth source add` is built from the source-kind registry: a kind's declared parameters are its flags,
the kind is `--kind` or the one the arguments fit, and a new kind needs no CLI edit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import providers, sources
from engine.sources import Param, Recipe, SourceKind, fingerprint
from index.store import Store
from tests.helpers import run_cli


class Toy(SourceKind):
    """a toy kind (tests only): a file of precomputed images"""

    name = "toy"
    needs_gpu = False
    params = (Param("path", str, None, "the toy's image file", positional=True, required=True, metavar="FILE"),
              Param("toy_level", int, 1, "how toy it is (default 1)", required=True, metavar="N"),
              Param("shiny", bool, False, "polish it"))

    def prepare(self, name: str, path, toy_level: int = 1, shiny: bool = False) -> Recipe:
        assert isinstance(toy_level, int) and isinstance(shiny, bool)
        return Recipe(path=str(path), params={"toy_level": toy_level, "shiny": shiny},
                      fingerprint=fingerprint("toy", str(path), toy_level, shiny))


@pytest.fixture
def toy():
    sources.kinds()  # the built-in kinds first
    sources.register(Toy())
    try:
        yield
    finally:
        sources._KINDS.pop("toy", None)  # the registry's own dict: no public unregister (not needed outside tests)


@pytest.fixture
def store(tmp_path) -> Path:
    root = tmp_path / "store"
    Store.create(root, {"identity": "test-embedder", "arch": "x", "checkpoint": "x"}, 8).close()
    return root


def _listed(capsys, store) -> dict:
    capsys.readouterr()
    assert run_cli("source", "list", "--store", store, "--json") == 0
    return {row["name"]: row for row in json.loads(capsys.readouterr().out)}


def test_a_registered_kind_gets_its_flags_and_enrols_through_the_cli(toy, store, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        run_cli("source", "add", "--help")
    help_text = capsys.readouterr().out
    assert "toy sources" in help_text and "--toy-level N" in help_text and "--shiny" in help_text
    assert "a toy kind (tests only)" in help_text and "--kind {diffusers,api,replay," in help_text
    assert ",toy}" in help_text
    monkeypatch.setenv("HOME", str(tmp_path))
    # chosen by its flag, the text converted to the Param's type, the path's `~` expanded
    assert run_cli("source", "add", "t1", "~/images.bin", "--toy-level", "3", "--shiny", "--store", store) == 0
    # or named; a flag of another kind is refused in one line, naming the kinds that take it
    assert run_cli("source", "add", "t2", "x.bin", "--kind", "toy", "--toy-level", "4", "--steps", "2",
                   "--store", store) == 2
    assert "--steps does not apply to toy sources (--steps: diffusers" in capsys.readouterr().err
    assert run_cli("source", "add", "t3", "x.bin", "--toy-level", "many", "--store", store) == 2
    assert "--toy-level of a toy source must be an integer" in capsys.readouterr().err
    listed = _listed(capsys, store)
    assert listed["t1"]["kind"] == "toy" and listed["t1"]["path"] == str(tmp_path / "images.bin")
    assert listed["t1"]["params"] == {"toy_level": 3, "shiny": True} and set(listed) == {"t1"}


def test_the_kind_is_the_one_the_arguments_fit(capsys):
    """Refusals come before the store is opened (none is given here)."""
    cases = [
        ((), "give DIR (kind diffusers), or --api URL --model MODEL (kind api), or "),
        ((), "or --kind KIND (see `resynth source add --help`)"),
        (("/x", "--model", "m"), "--model does not apply to diffusers sources (--model: api)"),
        (("/x", "--api", "http://h", "--model", "m"), "the argument '/x' does not apply to api sources"),
        (("--api", "http://h"), "api sources need --model MODEL"),
        (("--api", "http://h", "--model", "m", "--steps", "3"), "--steps does not apply to api sources"),
        (("/x", "--size", "1024x1024"), "--size of a diffusers source must be an integer"),
        (("--api", "http://h", "--model", "m", "--rate", "2/x"), "--rate must look like 60 or 60/min or 2/s"),
        (("--api", "http://h", "--model", "m", "--extra", "[1]"), "--extra must be a JSON object"),
        (("--kind", "replay", "--guidance", "3"), "--guidance does not apply to replay sources"),
    ]
    for argv, message in cases:
        assert run_cli("source", "add", "x", *argv, "--store", "/nonexistent/store") == 2, argv
        assert message in capsys.readouterr().err, argv
    # a value outside a flag's choices: the one line HTTP gives too (POST /v1/sources), not argparse's usage
    assert run_cli("source", "add", "x", "--api", "http://h", "--model", "m", "--protocol", "nope") == 2
    assert "--protocol of an api source must be one of bfl, " in capsys.readouterr().err


def test_api_flags_protocol_and_size_pass_through(store, capsys, monkeypatch):
    monkeypatch.setenv("FLUX_KEY", "secret")
    assert run_cli("source", "add", "flux", "--api", "https://api.example.org", "--protocol", "bfl", "--model",
                   "flux-pro-1.1", "--size", "1024x768", "--api-key-env", "FLUX_KEY", "--price", "0.04",
                   "--rate", "2/s", "--extra", '{"safety_tolerance": 2}', "--store", store) == 0
    assert run_cli("source", "add", "dalle", "--api", "https://api.example.org", "--model", "dall-e-3",
                   "--store", store) == 0
    listed = _listed(capsys, store)
    flux, dalle = listed["flux"], listed["dalle"]
    assert flux["kind"] == "api" and flux["params"]["protocol"] == "bfl" and flux["params"]["size"] == "1024x768"
    assert flux["params"]["rate"] == 120.0 and flux["params"]["extra"] == {"safety_tolerance": 2}
    assert flux["path"] == providers.get("bfl").endpoint("https://api.example.org", "flux-pro-1.1")
    assert dalle["params"]["protocol"] == "openai" and dalle["path"] == "https://api.example.org/v1/images/generations"
    assert "secret" not in json.dumps(listed)
    capsys.readouterr()
    assert run_cli("source", "list", "--store", store) == 0
    text = capsys.readouterr().out
    assert "protocol bfl" in text and "protocol openai" not in text  # the default is not a recipe detail


def test_a_diffusers_path_is_expanded_before_it_is_checked(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert run_cli("source", "add", "x", "~/no-such-pipeline", "--steps", "2", "--store", store) == 2
    err = capsys.readouterr().err
    assert "pipeline folder not found" in err and str(tmp_path / "no-such-pipeline") in err


def test_a_name_typed_in_another_unicode_form_is_the_stored_one(store, capsys):
    """A source ingested under its decomposed name (a macOS folder) was "unknown source 'café' (known: café)" to
    every command where it was typed in NFC: `--sources` and `source remove` find it now."""
    import unicodedata

    import engine
    from engine.options import Options

    decomposed = unicodedata.normalize("NFD", "café")
    with Store.open(store) as opened:
        opened.ensure_source(decomposed, "replay", "fp-1")
        opened.ensure_source("other", "replay", "fp-2")
    with engine.open(store) as ws:
        assert [s.name for s in ws.plan(Options(sources=("café", decomposed))).sources] == [decomposed]
        from engine import triage  # a triage rerun typed in the other form resumes (it was another run's key)

        assert len({triage.run_key(ws, Options(sources=names), None) for names in ("café", decomposed)}) == 1
    # nor is a second source stored under the other form: every lookup above would be ambiguous
    assert run_cli("source", "add", "café", "--kind", "replay", "--store", store) == 2
    assert "already exists, spelled in another Unicode form ('cafe\\u0301'" in capsys.readouterr().err
    assert run_cli("source", "remove", "café", "--store", store) == 0
    assert list(_listed(capsys, store)) == ["other"]
    # an older store may hold both forms: a manifest's row keeps the exact one (it took either, by set order)
    from engine.ingest import _check_sources
    from engine.manifest import ManifestRow

    class InOrder(set):  # a set that iterates as listed: each order tried, not the one hashing gives
        def __iter__(self):
            return iter(self.order)

    for order in (["café", decomposed], [decomposed, "café"]):
        known = InOrder(order)
        known.order = order
        row = ManifestRow(2, Path("x.png"), "café", "d", "original")
        assert _check_sources(Path("m.csv"), [row], known) == [] and row.source == "café"


def test_an_api_url_that_can_never_be_reached_or_holds_a_password_is_refused_at_add(store, capsys):
    """`http://[::1` was a traceback at `source add`; a port out of range, a space or newline in the URL and a
    timeout of 1e300 were stored and then failed every request (retried 5 times as an unknown host, or 'timestamp
    out of range'); `https://user:pass@host` stored the password, shown by `source list`."""
    for url, extra, said in (
            ("http://[::1", (), "API URL must be http:// or https:// with a host, not 'http://[::1'"),
            ("https://api.example.org:99999", (), "API URL 'https://api.example.org:99999': its port is not a number"),
            ("https://api.example.org:0", (), "its port is not a number from 1 to 65535"),
            ("https://api .example.org", (), "holds a space or control character"),
            ("https://api.example.org/\nX-Injected: 1", (), "holds a space or control character"),
            ("https://user:hunter2@api.example.org", (), "shown by `source list`: give the key with --api-key-env VAR"),
            ("https://api.example.org", ("--protocol", "firefly", "--model", "image4_standard", "--api-key-env", "S",
                                         "--client-id-env", "C", "--token-url", "https://ims.example.org:0/x"),
             "--token-url 'https://ims.example.org:0/x': its port is not a number"),
            ("https://api.example.org", ("--timeout", "1e300"), "API timeout must be at most 86400 seconds")):
        capsys.readouterr()
        model = () if "--model" in extra else ("--model", "m")
        assert run_cli("source", "add", "x", "--api", url, *model, *extra, "--store", store) == 2, url
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "hunter2" not in err
    # a model name that goes into the URL's path (bfl, stability, google) went there as typed: HTTP 404 at each request
    for protocol, model, said in (("bfl", "flux-pro 1.1", "goes into the request's URL"),
                                  ("google", "../../admin", "no spaces, ?, #, %, \\ or .. parts"),
                                  ("openai", "dall-e-3\n", "holds a control character")):
        capsys.readouterr()
        assert run_cli("source", "add", "x", "--api", "https://api.example.org", "--protocol", protocol, "--model",
                       model, "--store", store) == 2, model
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert _listed(capsys, store) == {}
    assert run_cli("source", "add", "x", "--api", "https://api.example.org:8443/v1?api-version=2", "--model", "m",
                   "--timeout", "86400", "--store", store) == 0
    for n, (protocol, model) in enumerate((("openai", "dall e 3"), ("replicate", "owner/name:5c7d5dc6dd8bf75c1"),
                                           ("google", "models/gemini-2.5-flash-image"), ("fal", "fal-ai/flux/dev"),
                                           ("stability", "sd3.5-large"), ("bfl", "flux-pro-1.1"))):
        assert run_cli("source", "add", f"ok{n}", "--api", "https://api.example.org", "--protocol", protocol,
                       "--model", model, "--store", store) == 0, model
    # a source stored before these checks still lists and loads (its requests fail, one line each)
    from engine.api_params import ApiParams

    assert ApiParams.from_json(ApiParams("https://u:p@api.example.org:99999", "m").to_json()).model == "m"
