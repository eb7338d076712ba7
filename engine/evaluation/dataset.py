"""The labelled set the protocol runs on: the method layer's (engine.labelled), re-exported."""
from engine.labelled import EvalSet, from_manifest, from_rows, from_store  # noqa: F401
