"""Classification and calibration metrics: the method layer's (engine.metrics), re-exported."""
from engine.metrics import *  # noqa: F401,F403
