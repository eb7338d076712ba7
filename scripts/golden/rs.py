"""Run resynth's CLI from a chosen source tree, bypassing an editable install: python rs.py SRC ARGS..."""
import importlib
import sys


def main() -> int:
    src = sys.argv.pop(1)
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "editable" not in getattr(f, "__module__", "") and "editable" not in repr(f).lower()]
    sys.path.insert(0, src)
    engine = importlib.import_module("engine")
    assert engine.__file__.startswith(src), engine.__file__
    sys.argv[0] = "resynth"
    return importlib.import_module("engine.cli").main()


if __name__ == "__main__":
    sys.exit(main())
