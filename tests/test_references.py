"""K caps generation, not evidence: every stored resynthesis of a description counts, up to `references`."""
from __future__ import annotations

import numpy as np

from engine import Options
from engine.attribute import Query
from engine.workspace import Workspace
from index.keys import sha256_text
from index.store import NewImage, Store

DIM = 8


def _unit(cos: float, axis: int) -> np.ndarray:
    """A unit vector at cosine `cos` from e0, leaning towards e_axis."""
    v = np.zeros(DIM, np.float32)
    v[0], v[axis] = cos, np.sqrt(1 - cos * cos)
    return v


def _synthetic_store(root) -> Workspace:
    """Two replay sources with 16 resyntheses each of one description. A's first three (by seed) are far
    from the query and its other thirteen close; B's first three are fairly close, the rest far. With
    the first K=3 only, B wins (wrongly); with every stored reference, A wins."""
    store = Store.create(root, {"identity": "synthetic/block1", "arch": "none", "checkpoint": "none"}, DIM)
    ws = Workspace(store)
    for name in ("A", "B"):
        ws.add_replay_source(name)
    ids = {s.name: s.id for s in ws.sources()}
    description = store.description_id("a portrait")
    rows = []
    for name, near, far in (("A", _unit(0.9, 1), _unit(0.0, 2)), ("B", _unit(0.5, 3), _unit(0.0, 4))):
        for seed in range(16):
            vector = (far if seed < 3 else near) if name == "A" else (near if seed < 3 else far)
            key = sha256_text(f"{name}-{seed}")
            rows.append(NewImage(key=key, role="resynthesis", source_id=ids[name], description_id=description,
                                 file_hash=key, path=f"{key}.png", vector=vector, seed=seed))
    store.add_images(rows)
    return ws


def test_every_stored_reference_counts_by_default(tmp_path):
    with _synthetic_store(tmp_path / "s") as ws:
        query = Query(image=None, file_hash="query", label="q")
        vector = _unit(1.0, 1)

        def attribute(options: Options):
            plan = ws.plan(options)
            return ws.score(query, "a portrait", "prompt", vector, plan, ws.candidates("a portrait", plan))

        default = attribute(Options())
        assert Options().per_source == 3 and default.predicted == "A"
        assert {s.source: s.resyntheses for s in default.scores} == {"A": 16, "B": 16}
        capped = attribute(Options(references=3, mode="resynthesis"))  # the old behaviour: K capped evidence
        assert capped.predicted == "B" and {s.resyntheses for s in capped.scores} == {3}
        for aggregation in ("max", "knn", "softmax"):
            assert attribute(Options(aggregation=aggregation, mode="resynthesis")).predicted == "A"


def test_references_removed_meanwhile_are_not_evidence_and_not_an_error(tmp_path):
    """A request that gathered its candidates just before another process removed a source is answered
    as if it came after: the removed vectors drop out, no error."""
    with _synthetic_store(tmp_path / "s") as ws:
        plan = ws.plan(Options(mode="resynthesis"))
        found = ws.candidates("a portrait", plan)  # gathered ...
        other = Store.open(tmp_path / "s")
        other.remove_source("B")  # ... then B goes, in another handle
        other.close()
        ws.store.refresh()
        result = ws.score(Query(image=None, file_hash="q", label="q"), "a portrait", "prompt", _unit(1.0, 1),
                          plan, found)
        assert [s.source for s in result.scores] == ["A"] and result.predicted == "A"
