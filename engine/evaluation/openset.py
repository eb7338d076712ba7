"""Open-set scores and temperature fitting: the method layer's (engine.openset), re-exported."""
from engine.openset import *  # noqa: F401,F403
