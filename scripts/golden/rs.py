"""Run resynth's CLI from a chosen source tree, bypassing the editable finder: python rs.py SRC args..."""
import sys
src = sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "") and "editable" not in repr(f).lower()]
sys.path.insert(0, src)
from engine.cli import main
import engine
assert engine.__file__.startswith(src), engine.__file__
sys.argv[0] = "resynth"
sys.exit(main())
