"""Compare golden outputs: python cmp.py BEFORE AFTER. Paths normalised, timings and new keys dropped."""
import json
import sys
import pathlib
import re
before, after = map(pathlib.Path, sys.argv[1:3])
NEW = {"provenance", "closest"}
TIME = re.compile(r"(seconds|elapsed|_s$|_ms$|time|created)")
def norm(x, root):
    if isinstance(x, dict):
        return {k: norm(v, root) for k, v in x.items() if k not in NEW and not TIME.search(k)}
    if isinstance(x, list):
        return [norm(v, root) for v in x]
    if isinstance(x, str):
        return x.replace(str(root), "$O")
    return x
same = diff = 0
for f in sorted(before.glob("*.json")) + sorted(before.glob("*.err")):
    g = after / f.name
    a, b = f.read_text(), g.read_text() if g.exists() else "<missing>"
    if f.suffix == ".json":
        try:
            a = json.dumps(norm(json.loads(a), before), indent=1, sort_keys=True) if a.strip() else ""
            b = json.dumps(norm(json.loads(b), after), indent=1, sort_keys=True) if b.strip() else ""
        except json.JSONDecodeError:
            a, b = a.replace(str(before), "$O"), b.replace(str(after), "$O")
    else:
        a, b = a.replace(str(before), "$O"), b.replace(str(after), "$O")
    if a == b:
        same += 1
    else:
        diff += 1
        import difflib
        print(f"=== {f.name}")
        print("".join(list(difflib.unified_diff(a.splitlines(True), b.splitlines(True), n=1))[:40]))
print(f"{same} identical, {diff} different")
