"""A paid task is paid for once: a submit-then-poll service's task that a run accepted but did not store
(the polling loop past --timeout, a real process killed with SIGKILL while polling, a failed download)
is resumed by the next run from its durable record in the store, not bought again; a task the service
no longer has is bought again once, with one warning line (engine.api_tasks, index.pending)."""
from __future__ import annotations

import json
import logging

import pytest

import socket
import sqlite3
import threading

from engine import api_exchange, api_http, api_tasks
from engine.api_source import ApiGenerator, ApiParams
from index.pending import pending_tasks
from index.store import Store
from tests import procs
from tests.fake_images_api import FakeProviderApi
from tests.helpers import run_cli

KEY = "bfl-resume-5e4d3c2b1a-NEVER-STORED"
ENV = "RESYNTH_TEST_RESUME_KEY"
CLIENT_ENV = "RESYNTH_TEST_RESUME_CLIENT"
POLLED = (("replicate", "owner/model"), ("fal", "fal-ai/flux/dev"), ("firefly", "image4_standard"))  # bfl aside
TIMEOUT = 0.8  # seconds: the polling loop of the first test runs it out


@pytest.fixture(scope="module")
def bfl_store(models, tmp_path_factory):
    """One store with one Black Forest Labs source (timeout 0.8 s) behind the loopback stand-in."""
    store = tmp_path_factory.mktemp("resume") / "store"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV, KEY)
        patch.setattr(api_exchange, "POLL_FIRST", 0.01)
        patch.setattr(api_exchange, "BACKOFF_BASE", 0.01)
        assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                       "--clip-checkpoint", models["clip_checkpoint"], "--quiet") == 0
        with FakeProviderApi(key=KEY, pending_polls=0) as api:
            assert run_cli("source", "add", "flux", "--api", api.url, "--protocol", "bfl", "--model", "flux-dev",
                           "--api-key-env", ENV, "--price", 0.04, "--timeout", TIMEOUT, "--store", store,
                           "--quiet") == 0
            yield store, api


def resynthesize(store, capsys, text: str) -> dict:
    listing = store.parent / "descriptions.txt"
    listing.write_text(text + "\n")
    capsys.readouterr()
    run_cli("resynthesize", listing, "--store", store, "--per-source", 1, "--sources", "flux", "--json", "--quiet")
    return json.loads(capsys.readouterr().out)


def submitted(api: FakeProviderApi, text: str) -> int:
    bodies = [entry["body"] or {} for entry in api.submissions()]
    return sum(1 for body in bodies if text in (body.get("prompt"), (body.get("input") or {}).get("prompt")))


def stored_bytes(store) -> bytes:
    return b"".join(path.read_bytes() for path in store.rglob("*") if path.is_file())


def recorded(store) -> int:
    with Store.open(store, writable=False) as opened:
        return pending_tasks(opened).count()


def test_a_task_polled_past_the_timeout_is_resumed_not_bought_again(bfl_store, capsys):
    store, api = bfl_store
    text = "a lighthouse in slow fog"
    api.pending_polls = 10 ** 6  # never ready within the source's timeout
    try:
        first = resynthesize(store, capsys, text)
    finally:
        api.pending_polls = 0
    assert first["generated"] == 0 and f"not ready within the {TIMEOUT:g} s deadline" in first["failed"]["flux"]
    assert run_cli("stats", "--store", store) == 0  # what was paid for and is not stored yet is said
    assert "; 1 paid task without its image yet, resumed by the next run)" in capsys.readouterr().out
    again = resynthesize(store, capsys, text)
    assert again["generated"] == 1 and not again["failed"]
    assert submitted(api, text) == 1 and recorded(store) == 0


def test_a_process_killed_while_polling_leaves_its_task_to_the_next_run(bfl_store, capsys):
    store, api = bfl_store
    text = "a kettle on a cold stove"
    listing = store.parent / "killed.txt"
    listing.write_text(text + "\n")
    killed = procs.resynth("resynthesize", listing, "--store", store, "--per-source", 1, "--sources", "flux",
                           "--quiet", crash_at="api:accepted", env={ENV: KEY})
    assert killed.returncode == -9 and submitted(api, text) == 1  # killed once the service accepted the task
    assert KEY.encode() not in stored_bytes(store)  # the record says where to poll, never with what key
    again = resynthesize(store, capsys, text)
    assert again["generated"] == 1 and submitted(api, text) == 1 and recorded(store) == 0


def test_a_task_the_service_no_longer_has_is_bought_again_once_with_a_warning(bfl_store, capsys, caplog):
    store, api = bfl_store
    text = "a tram stop at noon"
    api.download_failures = 50  # finished, but its image cannot be fetched in this run
    try:
        first = resynthesize(store, capsys, text)
    finally:
        api.download_failures = 0
    assert first["generated"] == 0 and "image" in first["failed"]["flux"]  # its retries, or the deadline, ran out
    api.expire()  # past the service's retention: "Task not found"
    caplog.set_level(logging.WARNING, logger="engine.api_source")
    again = resynthesize(store, capsys, text)
    assert again["generated"] == 1 and submitted(api, text) == 2 and recorded(store) == 0
    warned = [r.getMessage() for r in caplog.records if "an earlier run paid for is gone" in r.getMessage()]
    assert len(warned) == 1 and "Task not found" in warned[0] and "\n" not in warned[0], warned


def test_records_past_the_retention_or_the_host_rules_are_dropped_unasked(bfl_store, monkeypatch, caplog, capsys):
    store, api = bfl_store
    with Store.open(store) as opened:
        pending = pending_tasks(opened)
        generator = ApiGenerator("flux", ApiParams(api.url, "flux-dev", protocol="bfl", api_key_env=ENV, timeout=5))
        pending.put("k-private", "flux", {"v": 1, "protocol": "bfl", "endpoint": generator.params.endpoint(),
                                          "state": {"poll": "http://10.0.0.1/v1/get_result?id=t0"}})
        book = api_tasks.TaskBook(pending, "flux", ["k-private"])
        book.load()
        assert generator.generate_many([("a private poll", 0)], tasks=book)  # bought anew, never polled there
        assert submitted(api, "a private poll") == 1
        assert "cannot be polled (refused status URL on a non-public address (10.0.0.1" in caplog.text
        book.stored(["k-private"])
        pending.put("k-old", "flux", {"v": 1, "protocol": "bfl", "endpoint": api.url, "state": {"poll": api.url}})
        monkeypatch.setattr(api_tasks, "RESUME_FOR_S", 0.0)  # every record is past it
        assert pending.by_source() == {"flux": 1} and pending.by_source(within=0.0) == {}
        capsys.readouterr()
        assert run_cli("stats", "--store", store) == 0  # not said to be resumed: the next run drops it unasked
        assert "paid task" not in capsys.readouterr().out
        book = api_tasks.TaskBook(pending, "flux", ["k-old"])
        book.load()
        assert book.record("k-old") is None and pending.count() == 0


def test_a_locked_database_while_old_records_go_still_resumes_the_fresh_ones(bfl_store, monkeypatch, caplog):
    """Dropping a batch's records past the retention waits for the write lock; when another writer holds it
    past the busy timeout, the batch's fresh records are still resumed (all were ignored: bought again)."""
    store, _ = bfl_store
    monkeypatch.setenv("RESYNTH_BUSY_TIMEOUT_S", "0.05")
    with Store.open(store) as opened:
        pending = pending_tasks(opened)
        for key in ("k-old", "k-fresh"):
            pending.put(key, "flux", {"v": 1, "protocol": "bfl", "endpoint": key, "state": {}})
        other = sqlite3.connect(store / "metadata.sqlite", isolation_level=None)
        try:
            other.execute("UPDATE pending_tasks SET created_at = created_at - ? WHERE key = 'k-old'",
                          (2 * api_tasks.RESUME_FOR_S,))
            other.execute("BEGIN IMMEDIATE")  # another writer holds the store's write lock
            book = api_tasks.TaskBook(pending, "flux", ["k-old", "k-fresh"])
            book.load()
            with caplog.at_level(logging.WARNING, logger="engine.api_source"):
                for key in ("k-a", "k-b"):  # a store that cannot record says so once a batch, not once a task
                    book.save(key, "bfl", "e", {})
        finally:
            other.close()
        assert book.record("k-old") is None and book.record("k-fresh") is not None
        assert len([r for r in caplog.records if r.levelno == logging.WARNING
                    and "cannot record an accepted task" in r.getMessage()]) == 1
        pending.drop(["k-old", "k-fresh"])


def test_a_record_whose_host_cannot_be_looked_up_now_is_kept_not_bought_again(bfl_store, monkeypatch):
    """A failed name lookup is the network's, not the record's: the job fails as a lost poll does and the task
    stays recorded (it was dropped and bought again: offline once, then charged twice). The same when the
    lookup fails as the task is accepted: recorded, so a later poll tries it. A status URL carrying the key is
    not recorded (the key was stored in the record)."""
    store, api = bfl_store
    regional = "https://api.us1.region.invalid/v1/get_result?id=t9"

    resolve = api_http.resolve

    def no_resolver(host, port, timeout):  # the resolver is away for names (addresses need none)
        if host.endswith(".invalid"):
            raise socket.gaierror(-3, "Temporary failure in name resolution")
        return resolve(host, port, timeout)

    monkeypatch.setattr(api_http, "resolve", no_resolver)
    with Store.open(store) as opened:
        pending = pending_tasks(opened)
        generator = ApiGenerator("flux", ApiParams(api.url, "flux-dev", protocol="bfl", api_key_env=ENV, timeout=5))
        record = {"v": 1, "protocol": "bfl", "endpoint": generator.params.endpoint(), "state": {"poll": regional}}
        pending.put("k-lookup", "flux", record)
        book = api_tasks.TaskBook(pending, "flux", ["k-lookup", "k-accepted"])
        book.load()
        with pytest.raises(api_exchange.SourceError, match="cannot resolve the status URL's host"):
            generator.generate_many([("an offline resume", 0)], tasks=book)
        assert submitted(api, "an offline resume") == 0 and pending.get(["k-lookup"])["k-lookup"][0] == record
        call = api_exchange._Call(generator, None, KEY, threading.Event(), None, book.slot(1))  # type: ignore[arg-type]
        call.accepted({"poll": regional})  # a poll would look it up again (and fail, the record kept)
        assert pending.get(["k-accepted"])["k-accepted"][0]["state"] == {"poll": regional}
        pending.drop(["k-lookup", "k-accepted"])
        call.accepted({"poll": f"{api.url}/v1/get_result?id=t9&key={KEY}"})  # a service that echoes the key
        assert pending.get(["k-accepted"]) == {} and KEY.encode() not in stored_bytes(store)
        call.accepted({"poll": "http://10.0.0.1/v1/get_result?id=t9"})  # refused: not recorded, and its poll
        assert pending.get(["k-accepted"]) == {}  # is refused; an answer holding the image is still read


def test_every_polled_protocol_records_its_task_and_resumes_it(bfl_store, monkeypatch):
    """The same for the other polled protocols, on the generator: a task recorded and not yet stored is
    resumed by the next call, not bought again."""
    store, api = bfl_store
    monkeypatch.setenv(CLIENT_ENV, FakeProviderApi.FIREFLY_CLIENT_ID)
    with Store.open(store) as opened:
        pending = pending_tasks(opened)
        for protocol, model in POLLED:
            oauth = {"client_id_env": CLIENT_ENV, "token_url": f"{api.url}/ims/token/v3"} \
                if protocol == "firefly" else {}
            generator = ApiGenerator(protocol, ApiParams(api.url, model, protocol=protocol, api_key_env=ENV,
                                                         timeout=5, **oauth), backoff_base=0.01)
            prompt, key = f"a {protocol} task resumed", f"key-{protocol}"
            images = []
            for _ in range(2):  # the first call's image is never stored: the second resumes its task
                book = api_tasks.TaskBook(pending, protocol, [key])
                book.load()
                images += generator.generate_many([(prompt, 0)], tasks=book)
                assert pending.get([key])[key][0]["protocol"] == protocol
            assert submitted(api, prompt) == 1 and images[0].tobytes() == images[1].tobytes(), protocol
            held = stored_bytes(store)  # records of accepted tasks: no key, no token, no client id
            assert not any(secret.encode() in held for secret in (KEY, FakeProviderApi.FIREFLY_CLIENT_ID, *api.issued))
            book.stored([key])
            assert pending.get([key]) == {}


def test_a_reembed_between_the_runs_leaves_the_task_resumable(bfl_store, capsys, models):
    """`reembed` re-keys every stored image (keys name the embedder); a record under such a key was orphaned
    and the task bought again. Records are keyed without the embedder (`Plan.task_key`). Last here: it
    changes the module's store's embedder."""
    store, api = bfl_store
    text = "a paid task across a reembed"
    api.pending_polls = 10 ** 6
    try:
        assert resynthesize(store, capsys, text)["generated"] == 0 and recorded(store) == 1
    finally:
        api.pending_polls = 0
    assert run_cli("reembed", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], "--clip-layer", "final", "--quiet") == 0
    assert resynthesize(store, capsys, text)["generated"] == 1
    assert submitted(api, text) == 1 and recorded(store) == 0


def test_stats_answer_for_a_role_that_may_not_read_the_task_records(tmp_path):
    """A PostgreSQL role granted the store's tables before pending_tasks was added (the owner's next open adds
    it) still gets its stats, writable too (as a server opens it): the paid tasks' count is unknown (None)."""
    import uuid

    from sqlalchemy.engine import make_url

    import engine
    from tests import pg

    admin = pg.admin_url()
    if not admin or not pg.superuser():
        pytest.skip(pg.why() or "the test server's role may not create roles")
    role, url, root = f"rows_{uuid.uuid4().hex[:8]}", pg.create_database(), tmp_path / "s"
    try:
        with Store.create(root, {"identity": "test-embedder", "arch": "x", "checkpoint": "x"}, 8, db_url=url) as made:
            made.ensure_source("flux", "api", "fp", params={"price": 0.04})
        pg.sql(url, f'CREATE ROLE "{role}" LOGIN', f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA '
               f'public TO "{role}"', f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{role}"',
               f'REVOKE ALL ON pending_tasks FROM "{role}"')
        config = json.loads((root / "store.json").read_text())
        config["db"] = make_url(url).set(username=role).render_as_string(hide_password=False)
        (root / "store.json").write_text(json.dumps(config))
        with engine.open(root) as ws:
            assert ws.stats()["sources"]["flux"]["api"]["tasks_pending"] is None
    finally:
        pg.drop_database(url)
        pg.sql(admin, f'DROP ROLE IF EXISTS "{role}"')
