"""The store as real non-root users see it: file modes bind only there (root passes every check).

Users of a group share one store (alice creates it, bob adds to it with umask 022, alice writes again), an
outsider (eve) asks for a write, and single files are owned by someone else or unreadable. Each command is
the real CLI in a process of its own, forked from tests/procs.py's warm server (a `runuser` process would
spend seconds importing torch each time), which then drops to the user's uid, groups and umask. This
machine's Python lives under /root (mode 700), which no user may search: the child first takes a private
mount namespace where the folders it needs are reachable, changing nothing outside that process.

Needs root, useradd and mount namespaces; skipped, saying why, anywhere else.
"""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from tests import procs
from tests.asuser import as_user
from tests.fake_images_api import FakeImagesApi

USERS = ("rsyn-alice", "rsyn-bob", "rsyn-eve")
GROUP = "rsyn-lab"  # alice and bob; eve is in no group of the store's
class Users:
    """Runs `resynth` as one of USERS; `expose` lists the folders the commands need."""

    def __init__(self, expose: list[Path], home: Path):
        self.expose, self.home = expose, home

    def run(self, user: str, *argv, umask: int = 0o022) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="rsyn-out-") as folder:
            out, err = Path(folder, "out"), Path(folder, "err")
            out.touch(), err.touch()
            env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(self.home / user),
                   "PATH": "/usr/bin:/bin"}
            args = [str(a) for a in argv] if argv[:1] == ("-c",) else ["--quiet", *(str(a) for a in argv)]
            process = procs._forkserver().Process(target=as_user, args=(user, umask, args, env, self.expose,
                                                                         str(out), str(err)))
            process.start()
            process.join(180)
            if process.exitcode is None:
                process.kill()
                process.join()
            return subprocess.CompletedProcess(argv, process.exitcode, out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))


def _ensure(kind: str, name: str, *args: str) -> bool:
    """Create the group or user `name` unless it exists; whether this session created it."""
    lookup = ["getent", "group" if kind == "groupadd" else "passwd", name]
    if subprocess.run(lookup, capture_output=True).returncode == 0:
        return False
    subprocess.run([kind, *args, name], check=True, capture_output=True)
    return True


@pytest.fixture(scope="session")
def users(models, tmp_path_factory):
    """USERS and GROUP on this machine (made for the session, removed after it), a world-searchable area
    under pytest's temporary folder, and a runner that checks it works."""
    if os.geteuid() != 0:
        pytest.skip("needs root: to create test users and to run commands as them")
    if not shutil.which("useradd") or not shutil.which("getent"):
        pytest.skip("needs useradd and getent to create test users")
    made: list[tuple[str, str]] = []
    try:
        if _ensure("groupadd", GROUP):
            made.append(("groupdel", GROUP))
        for user in USERS:
            groups = ["-G", GROUP] if user != "rsyn-eve" else []
            if _ensure("useradd", user, "-M", "-s", "/usr/sbin/nologin", *groups):
                made.insert(0, ("userdel", user))
        area = tmp_path_factory.mktemp("perm")
        area.chmod(0o755)
        Image.new("RGB", (64, 64), (120, 80, 40)).save(area / "q.png")  # the query: any image will do
        home = area / "home"
        for user in USERS:
            (home / user).mkdir(parents=True)
            shutil.chown(home / user, user)
        zoo = area / "zoo"  # the CLIP the commands read, readable by all (the session's is root's alone)
        shutil.copytree(Path(models["clip_config"]).parent, zoo / "clip")
        subprocess.run(["chmod", "-R", "a+rX", str(zoo)], check=True)
        runner = Users(sorted({Path(sys.base_prefix).resolve(), area.resolve()}), home)
        # a module nobody preloaded: the Python install is reachable
        probe = runner.run("rsyn-eve", "-c", "import xml.dom.minidom")
        if probe.returncode != 0:
            pytest.skip(f"cannot run Python as another user here: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
        # the source: an images API on loopback (a generation without loading diffusers in each process)
        with FakeImagesApi() as api:
            yield runner, area, {"clip": ["--clip-config", zoo / "clip" / Path(models["clip_config"]).name,
                                          "--clip-checkpoint", zoo / "clip" / Path(models["clip_checkpoint"]).name],
                                 "source": ["--api", api.url, "--model", "tiny", "--timeout", 20], "api": api}
    finally:
        for command, name in made:
            subprocess.run([command, name], capture_output=True)


def _tree(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every path under `root`: (mode, uid, gid, content of a file)."""
    found = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        found[str(path.relative_to(root))] = (info.st_mode, info.st_uid, info.st_gid,
                                              path.read_bytes() if path.is_file() else b"")
    return found


def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("resynth: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def team(users):
    """A team's store: alice makes it (umask 022) in the group's setgid folder and adds an API source; bob,
    with umask 077, attributes a new prompt (a generation, saved) and saves a calibration array as
    `resynth calibrate` does; alice then attributes another prompt, writing into the folders and over the
    files bob made. Each step's result is kept for the test to judge."""
    run, area, zoo = users
    folder = area / "team"
    folder.mkdir()
    shutil.chown(folder, group=GROUP)
    folder.chmod(0o2775)
    store = folder / "store"
    steps = [run.run("rsyn-alice", "init", "--store", store, *zoo["clip"]),
             run.run("rsyn-alice", "source", "add", "remote", *zoo["source"], "--store", store)]
    ask = ["attribute", area / "q.png", "--per-source", 1, "--no-adaptive", "--store", store]
    steps += [run.run("rsyn-bob", *ask, "--prompt", "a man with a hat", umask=0o077),
              run.run("rsyn-bob", "-c", "import numpy; from engine.calibration import save_array_atomic; "
                      f"save_array_atomic({str(store)!r}, numpy.eye(4))", umask=0o077),
              run.run("rsyn-alice", *ask, "--prompt", "a woman in a park")]
    return run, store, ask, steps


def test_team_store_stays_writable_by_the_group_whatever_the_umask(team):
    """Every step succeeds and leaves every file and folder the group's to write; an outsider's write is
    one line naming whose the store is and the way out, with nothing changed. Before: SQLite made
    metadata.sqlite 644, so bob found the store read-only ("permission denied"); folders bob made were
    his alone, where alice's next image failed after its generation; and his calibration file was 600, so
    alice's verdicts silently fell back from the calibrated open-set score to the plain one."""
    run, store, ask, steps = team
    for step in steps:
        assert step.returncode == 0, (step.args, step.stderr)
    owners = set()
    for path in [store, *store.rglob("*")]:
        info = path.stat()
        owners.add(pwd.getpwuid(info.st_uid).pw_name)
        assert info.st_gid == grp.getgrnam(GROUP).gr_gid, path
        assert info.st_mode & (stat.S_IRGRP | stat.S_IWGRP) == stat.S_IRGRP | stat.S_IWGRP, (path, oct(info.st_mode))
        assert not path.is_dir() or info.st_mode & stat.S_ISGID, path
    assert owners == {"rsyn-alice", "rsyn-bob"}  # each made files of their own

    before = _tree(store)
    eve = run.run("rsyn-eve", *ask, "--prompt", "a third prompt")
    line = _one_line(eve)
    assert eve.returncode == 5 and "read-only" in line and "rsyn-alice:rsyn-lab, mode 2775, not writable by rsyn-eve" \
        in line, line
    assert _tree(store) == before


def test_an_image_folder_this_user_may_not_write_is_refused_before_the_image_is_bought(team, users):
    """A store made before team stores were shared left image folders only their maker could write: the
    image was generated (here: bought) first, then its file refused. Now the folders are checked first."""
    run, store, ask, _ = team
    api = users[2]["api"]
    folder = next(p for p in (store / "images").iterdir() if p.is_dir())  # the source's folder of images
    mode, owner = folder.stat().st_mode, (folder.stat().st_uid, folder.stat().st_gid)
    os.chown(folder, 0, 0)
    folder.chmod(0o755)
    try:
        bought = len(api.log)
        refused = run.run("rsyn-alice", *ask, "--prompt", "a prompt nobody bought")
        line = _one_line(refused)
        assert refused.returncode == 5 and "(writing an image)" in line and "not writable by rsyn-alice" in line, line
        assert len(api.log) == bought  # nothing bought
    finally:
        os.chown(folder, *owner)
        folder.chmod(stat.S_IMODE(mode))


def test_parts_another_user_owns_or_hides(team):
    """Single files denied to alice: store.lock left by root, read-only to her, still locks a save (it was
    exit 5); an image file, the index file and a calibration array she may not read are reported by
    verify, naming their owner, mode and the chmod (it was exit 5 on the image, the index was called "not
    a file", and the array went unsaid); an unreadable database is one line saying the same."""
    run, store, _, _ = team
    lock = store / "store.lock"
    os.chown(lock, 0, 0)
    lock.chmod(0o644)
    rebuilt = run.run("rsyn-alice", "rebuild", "--store", store)
    assert rebuilt.returncode == 0, rebuilt.stderr
    alice = pwd.getpwnam("rsyn-alice").pw_uid
    image = next(p for p in (store / "images").rglob("*.png") if p.stat().st_uid == alice)
    image.chmod(0o000)
    index = store / "vectors.faiss"
    os.chown(index, 0, 0)
    index.chmod(0o600)
    array = next(store.glob("open-set-*.npy"))  # bob's calibration array
    array.chmod(0o200)
    checked = run.run("rsyn-alice", "verify", "--store", store)
    problems = [line for line in checked.stdout.splitlines() if "problem:" in line]
    assert checked.returncode == 4 and len(problems) == 3, (checked.stdout, checked.stderr)
    assert "the index file was not checked: vectors.faiss is root:root, mode 600, not readable" in problems[0]
    assert f"{array.name} is rsyn-bob:rsyn-lab, mode 200, not readable by rsyn-alice: its owner can `chmod -R g+r" \
        in problems[1], problems[1]
    assert f"{image.name} is rsyn-alice:rsyn-lab, mode 000" in problems[2] and "chmod -R u+r" in problems[2]
    (store / "metadata.sqlite").chmod(0o000)
    stats = run.run("rsyn-alice", "stats", "--store", store)
    line = _one_line(stats)
    assert stats.returncode == 5 and "metadata.sqlite is rsyn-alice:rsyn-lab, mode 000" in line, line


def test_init_in_a_folder_of_someone_else(users):
    """`init` in an existing folder this user may not write: one line saying so (it was "permission denied
    reading metadata.sqlite", a file that does not exist), and the folder stays empty."""
    run, area, zoo = users
    folder = area / "roots"
    folder.mkdir(mode=0o755)
    made = run.run("rsyn-eve", "init", "--store", folder, *zoo["clip"])
    line = _one_line(made)
    assert made.returncode == 5 and "creating metadata.sqlite" in line and "not writable by rsyn-eve" in line, line
    assert not any(folder.iterdir())
