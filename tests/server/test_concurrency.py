"""Ordering under concurrency: seqs unique and gap-free, and never visible out of order."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from syncengine.server.storage import Storage
from tests.server.conftest import PROTO, Api, item

REPO = Path(__file__).resolve().parents[2]


def _writer(api: Api, name: str, digest: str, batches: int, errors: list[BaseException]) -> None:
    try:
        for n in range(batches):
            items = [
                item(f"{name}-{n}-{k}", f"{name}/{n}-{k}.txt", None, digest, client_id=name)
                for k in range(2)
            ]
            results = api.commit(items, client_id=name)
            assert all(r["status"] == "ok" for r in results), results
    except BaseException as exc:  # reported by the test thread
        errors.append(exc)


def _reader(
    apis: list[Api], done: threading.Event, total: int, errors: list[BaseException]
) -> None:
    """Follow the feed through every server in turn; any gap means a later seq showed up first."""
    since = 0
    try:
        i = 0
        while since < total:
            page = apis[i % len(apis)].changes(since=since, limit=50)
            i += 1
            seqs = [c["seq"] for c in page["changes"]]
            assert seqs == list(range(since + 1, since + 1 + len(seqs))), (since, seqs)
            since = seqs[-1] if seqs else since
            if not seqs and done.is_set() and page["last_seq"] == since:
                break
    except BaseException as exc:
        errors.append(exc)


def _run(apis: list[Api], writers_per_api: int, batches: int) -> int:
    digest = apis[0].put_blob(b"shared content")
    errors: list[BaseException] = []
    done = threading.Event()
    total = len(apis) * writers_per_api * batches * 2
    # each writer thread on its own session (a requests.Session is not shared across threads)
    writer_apis = [Api(api.url, api.ws, api.token) for api in apis for _ in range(writers_per_api)]
    writers = [
        threading.Thread(target=_writer, args=(wapi, f"w{n}", digest, batches, errors))
        for n, wapi in enumerate(writer_apis)
    ]
    reader_apis = [[Api(api.url, api.ws, api.token) for api in apis] for _ in range(2)]
    writer_apis += [a for group in reader_apis for a in group]
    readers = [
        threading.Thread(target=_reader, args=(group, done, total, errors)) for group in reader_apis
    ]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join(60)
    done.set()
    for t in readers:
        t.join(60)
    for api in writer_apis:
        api.close()
    assert not errors, errors[0]
    return total


def test_parallel_commits_get_unique_gap_free_seqs(server_factory, storage, api_for):
    """Threads committing at once get seqs 1..N exactly once; readers never see a gap."""
    server = server_factory(storage)
    api = api_for(server, "alpha")
    total = _run([api], writers_per_api=6, batches=12)
    changes = api.changes(limit=1000)
    assert [c["seq"] for c in changes["changes"]] == list(range(1, total + 1))
    assert changes["last_seq"] == total
    assert len({c["doc_id"] for c in changes["changes"]}) == total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve_cmd(storage_args: list[str]) -> Iterator[str]:
    """Run `syncengine serve` as a real process on a free port; yields its URL."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-c",
        "import sys; from cli.main import main; sys.exit(main(sys.argv[1:]))",
        "serve",
        "--port",
        str(port),
        *storage_args,
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: requests.get(url + "/v1/health", timeout=1).status_code == 200, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


def _serve(dsn: str) -> contextlib.AbstractContextManager[str]:
    return _serve_cmd(["--db", dsn])


def _wait(ready: Callable[[], bool], proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {proc.stdout.read().decode(errors='replace')}")
        with contextlib.suppress(requests.RequestException):
            if ready():
                return
        time.sleep(0.1)
    raise AssertionError("serve did not start")


@pytest.mark.postgres
@pytest.mark.integration
def test_two_server_processes_on_one_postgresql_order_one_workspace(pg_dsn):
    """Two `serve` processes on one PostgreSQL: seqs unique, gap-free and read in order."""
    with _serve(pg_dsn) as url_a, _serve(pg_dsn) as url_b:
        storage = Storage(pg_dsn)
        try:
            token = storage.create_token("shared")[1]
        finally:
            storage.close()
        apis = [Api(url_a, "shared", token), Api(url_b, "shared", token)]
        try:
            health = [
                requests.get(u + "/v1/health", timeout=5).json()["server_id"]
                for u in (url_a, url_b)
            ]
            assert health[0] == health[1]  # one database, one server id
            total = _run(apis, writers_per_api=3, batches=10)
            for api in apis:
                page = api.changes(limit=1000)
                assert [c["seq"] for c in page["changes"]] == list(range(1, total + 1))
            listing = apis[1].call("GET", "/v1/ws/{ws}/docs", params={"limit": 1000}).json()
            assert len(listing["docs"]) == total and listing["last_seq"] == total
            blob = apis[0].put_blob(b"written through A")
            r = apis[1].call("GET", f"/v1/ws/{{ws}}/blobs/{blob}", headers=PROTO)
            assert r.content == b"written through A"  # any process serves any blob
        finally:
            for api in apis:
                api.close()


def test_sqlite_writers_of_one_process_queue_and_a_stuck_one_makes_the_next_busy(tmp_path, monkeypatch):
    """Writers wait on the process's own lock (no busy polling); past the busy timeout, BusyError (a 503)."""
    import syncengine.server.storage as storage_module
    from syncengine.errors import BusyError

    storage = Storage(data_dir=tmp_path)
    try:
        ws = storage.ensure_workspace("w")
        digest = "ab" * 32
        storage.put_prepared_blobs(ws, [(digest, 1, False, b"x")])
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with storage._write():
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(10)
        monkeypatch.setattr(storage_module, "_BUSY_TIMEOUT", 0.2)
        with pytest.raises(BusyError):
            storage.commit(ws, "c1", [item("d1", "a.txt", None, digest)])
        release.set()
        holder.join()
        outcome = storage.commit(ws, "c1", [item("d1", "a.txt", None, digest)])
        assert outcome.applied == 1
    finally:
        storage.close()


def test_a_waiting_commit_goes_before_a_waiting_blob_writer_and_the_blob_writer_still_gets_its_turn(monkeypatch):
    """The writers' gate: a commit waiting goes first; a blob writer waits for it at most _PATIENCE."""
    from syncengine.server import storage as storage_module
    from syncengine.server.storage import _WriterGate

    # Patience longer than the sleeps below can stretch on a loaded machine: the blob writer,
    # waiting since before the commit came, must still be within it when the holder leaves.
    monkeypatch.setattr(storage_module, "_PATIENCE", 5.0)
    gate = _WriterGate()
    order: list[str] = []
    release = threading.Event()

    def writer(name: str, urgent: bool, hold: threading.Event | None = None) -> None:
        with gate.held(urgent):
            order.append(name)
            if hold is not None:
                hold.wait(10)

    holder = threading.Thread(target=writer, args=("holder", False, release))
    holder.start()
    while not order:
        time.sleep(0.001)
    blob = threading.Thread(target=writer, args=("blob", False))
    blob.start()
    time.sleep(0.05)  # the blob writer is waiting
    commit = threading.Thread(target=writer, args=("commit", True))
    commit.start()
    time.sleep(0.05)  # and the commit too
    release.set()
    for thread in (holder, blob, commit):
        thread.join(10)
    assert order == ["holder", "commit", "blob"]
    with gate.held(False), gate.held(True):  # reentrant in one thread
        order.append("nested")
    # A blob writer that keeps meeting commits waiting takes its turn after its patience
    # (without it, this would wait out the busy timeout and raise BusyError).
    monkeypatch.setattr(storage_module, "_PATIENCE", 0.1)
    gate._urgent = 1
    with gate.held(False):
        order.append("patient")
    assert order[-2:] == ["nested", "patient"]
