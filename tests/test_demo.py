"""`resynth demo` end to end: offline, accurate well above chance, cache proven by the repeat pass."""
from __future__ import annotations

import json

from tests.helpers import run_cli


def test_demo_end_to_end(tmp_path, capsys):
    assert run_cli("demo", "--workdir", tmp_path / "demo", "--json", "--quiet") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"]["overall"] >= 0.7 > 2 * report["accuracy"]["chance"]
    assert report["first_pass"]["generated"] > 0 and report["first_pass"]["cached"] > 0
    assert report["repeat"]["generated"] == 0
    assert report["store"]["vectors"] == report["store"]["index_vectors"]
    # The store the demo leaves behind works with the ordinary commands.
    store = tmp_path / "demo" / "store"
    assert run_cli("rebuild", "--store", store, "--json") == 0
    assert json.loads(capsys.readouterr().out)["vectors"] == report["store"]["vectors"]
    assert run_cli("stats", "--store", store, "--json") == 0
    assert len(json.loads(capsys.readouterr().out)["sources"]) == len(report["accuracy"]["per_source"]) == 5
    # Running it again on the same folder starts over cleanly; a foreign folder is refused.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    assert run_cli("demo", "--workdir", foreign) == 2
    assert (foreign / "thesis.tex").exists()
