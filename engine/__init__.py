"""resynth's method: describe, resynthesize, embed, attribute."""
import os

# Weights only ever come from local paths: an accidental hub download must fail at once, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
