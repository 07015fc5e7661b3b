"""Replicas for end-to-end tests: real workspaces bound to a real test server.

``Replicas(server, tmp_path)`` makes workspaces that sync with ``server``
in-process through the public API (``Workspace.sync``), so a test can drive
A -> server -> B without starting a CLI per step; ``close()`` closes them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from syncengine import Workspace
from syncengine.testing import backdate, make_tree, read_tree


class Replica:
    """One workspace bound to a server workspace."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.root = ws.root

    def sync(self, **kw: Any):
        """One sync round (``Workspace.sync``); returns its SyncReport."""
        return self.ws.sync(**kw)

    def tree(self) -> dict[str, bytes]:
        return read_tree(self.root)

    def write(self, rel: str, data: bytes | str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def set_config(self, **server: Any) -> None:
        """Change ``[server]`` settings in config.toml (and in the open workspace)."""
        for key, value in server.items():
            setattr(self.ws.config.server, key, value)
        self.ws.config.save(self.ws.layout.config)


class Replicas:
    """A factory of replicas of one server workspace (one token shared by all)."""

    def __init__(self, server: Any, tmp_path: Path, workspace: str = "shared") -> None:
        self.server = server
        self.tmp = tmp_path
        self.workspace = workspace
        self.token = server.token(workspace)
        self.made: list[Replica] = []

    def make(self, name: str, tree: dict[str, Any] | None = None, *, token: str | None = None,
             workspace: str | None = None, url: str | None = None) -> Replica:
        root = self.tmp / name
        make_tree(root, tree or {})
        backdate(root)
        ws, _report = Workspace.init(root, server=url or self.server.url, name=workspace or self.workspace,
                                     token=token or self.token)
        replica = Replica(ws)
        self.made.append(replica)
        return replica

    def close(self) -> None:
        for replica in self.made:
            replica.ws.close()


# ---------------------------------------------------------------- a real `syncengine serve`


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """``syncengine serve`` as a real process (its own RSS, its own log), stopped on exit.

    It keeps its state in ``data_dir`` (SQLite), or in the PostgreSQL database
    ``db_url`` names (``--db``); ``token()`` talks to the same storage.
    """

    def __init__(self, data_dir: Path, log: Path, *args: str, tls_ca: Path | None = None,
                 db_url: str | None = None) -> None:
        self.data_dir, self.log, self.args, self.tls_ca, self.db_url = data_dir, log, args, tls_ca, db_url
        self.port = free_port()
        self.proc: Any = None

    def storage_args(self) -> list[str]:
        """The ``--db``/``--data`` flags naming this server's storage."""
        return ["--db", self.db_url] if self.db_url else ["--data", str(self.data_dir)]

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_ca else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> ServeProcess:
        import subprocess
        import sys

        import requests

        from syncengine.testing import wait_until
        from tests.helpers import REPO, cli_env

        self._out = open(self.log, "ab")  # closed in __exit__
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", *self.storage_args(), "--port", str(self.port),
             *self.args], stdout=self._out, stderr=subprocess.STDOUT, env=cli_env(), cwd=REPO)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                return requests.get(self.url + "/v1/health", timeout=2,
                                    verify=str(self.tls_ca) if self.tls_ca else True).ok
            except requests.RequestException:
                return False

        wait_until(up, timeout=30, message="syncengine serve to answer")
        return self

    def peak_rss_kib(self) -> int:
        """VmHWM of the server process: the most memory it ever held, in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc")

    def token(self, workspace: str) -> str:
        """A new token from `syncengine token create` (stdout is the token alone)."""
        from tests.helpers import run_proc

        result = run_proc("token", "create", "-w", workspace, *self.storage_args())
        assert result.code == 0, result.stderr
        return result.stdout.strip()

    def __exit__(self, *exc: object) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()
