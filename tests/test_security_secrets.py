"""No token anywhere it does not belong (RELIABILITY F3, F5).

A whole flow runs as real processes — `serve` at debug log level, `token
create`, `init`, syncs with conflicts, every read command with --json, an
auth failure, an unreachable server and a crash — and then every byte
written under the test folder and every captured stdout/stderr is searched
for the tokens. The only places a token may sit are the replicas' 0600
token files and the file it was handed in.
"""

from __future__ import annotations

import os
import stat
import traceback
from pathlib import Path

import pytest

from syncengine.errors import SyncEngineError
from syncengine.remote import HttpRemote
from tests.helpers import cli_env, run_proc
from tests.replicas import ServeProcess, free_port

pytestmark = pytest.mark.integration

BAD = "SENTINELbadtoken0123456789abcdefSENTINEL"


def _commands() -> set[str]:
    from cli.main import _register, cli

    _register()
    return set(cli.commands)


def _grep(root: Path, needles: dict[str, str], allowed: set[Path]) -> list[str]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path in allowed or path.is_symlink():
                continue
            data = path.read_bytes()
            hits += [f"{label} in {path.relative_to(root)}" for label, n in needles.items() if n.encode() in data]
    return hits


def test_no_token_in_logs_output_journal_or_crash_log(tmp_path: Path):
    """After a full real-process flow, the tokens appear only in their own 0600 token files."""
    data = tmp_path / "server-data"
    outputs: list[tuple[str, str]] = []

    def run(*args, env=None, ok=(0, 1)):
        result = run_proc(*args, env=env or cli_env())
        outputs.append((" ".join(map(str, args)), result.stdout + result.stderr))
        assert result.code in ok, (args, result.code, result.stderr)
        return result

    with ServeProcess(data, tmp_path / "serve.log", "--log-level", "debug") as server:
        token_a, token_b = server.token("team"), server.token("team")
        token_file = tmp_path / "token-a"
        token_file.write_text(token_a + "\n")
        a, b = tmp_path / "a", tmp_path / "b"
        for root in (a, b):
            root.mkdir()
        (a / "notes.md").write_text("line one\nline two\n")
        (a / "data.json").write_text('{"x": 1, "y": 2}\n')
        (a / "big.bin").write_bytes(os.urandom((1 << 20) + 10))
        run("init", a, "--server", server.url, "--workspace", "team", "--token-file", token_file, "--json")
        run("init", b, "--server", server.url, "--workspace", "team", "--json",
            env=cli_env(SYNCENGINE_TOKEN=token_b))
        run("-C", a, "sync", "--json")
        run("-C", b, "sync", "--json")
        (a / "data.json").write_text('{"x": 10, "y": 2}\n')
        (b / "data.json").write_text('{"x": 1, "y": 20}\n')
        (a / "notes.md").write_text("line one\nA's line two\n")
        (b / "notes.md").write_text("line one\nB's line two\n")
        run("-C", a, "sync", "--json")
        run("-C", b, "sync", "--json")
        run("-C", a, "sync")
        run("-C", b, "snapshot", "-m", "after the conflict")
        for command in ("status", "log", "diff", "snapshots", "conflicts", "events"):
            if command in _commands():
                run("-C", b, command, "--json")
                run("-C", a, command)
        run("-C", b, "sync", "--dry-run", "--json")
        run("-C", b, "gc", "--json")
        refused = run("-C", b, "sync", env=cli_env(SYNCENGINE_TOKEN=BAD), ok=(4,))
        assert "refused" in refused.stderr
        run("-C", b, "sync", env=cli_env(SYNCENGINE_SERVER=f"http://127.0.0.1:{free_port()}"), ok=(3,))
        (b / "crash.txt").write_text("pending\n")
        crashed = run("-C", b, "sync", env=cli_env(SYNCENGINE_FAILPOINT="push.before_commit=raise"), ok=(70,))
        assert (b / ".syncengine" / "crash.log").is_file(), crashed.stderr
        server_tokens = run("token", "list", "--data", data, "--json")
        assert token_a[:6] in server_tokens.stdout  # the prefix is shown, never more
    needles = {"token A": token_a, "token B": token_b, "bad token": BAD}
    token_files = {a / ".syncengine" / "token", b / ".syncengine" / "token"}
    for path in token_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (a / ".syncengine" / "token").read_text().strip() == token_a
    hits = _grep(tmp_path, needles, token_files | {token_file})
    hits += [f"{label} in the output of `{cmd}`" for cmd, text in outputs for label, n in needles.items() if n in text]
    assert not hits, "\n".join(hits)
    assert "POST /v1/ws/team/commit" in (tmp_path / "serve.log").read_text()  # the log was written


def test_client_errors_and_reprs_never_carry_the_token(server):
    """Every error the client raises (auth, unreachable, protocol, refusal) and its repr omit the token."""
    token = server.token("alpha")
    cases = [
        lambda: HttpRemote(server.url, "beta", token, retries=0).changes(0),  # foreign workspace: 404
        lambda: HttpRemote(server.url, "alpha", token + "x", retries=0).changes(0),  # unknown token: 401
        lambda: HttpRemote(f"http://127.0.0.1:{free_port()}", "alpha", token, retries=0).changes(0),
        lambda: HttpRemote(server.url, "alpha", token, retries=0).commit([]) or HttpRemote(
            server.url, "alpha", token, retries=0).missing(["nothex"]),
        lambda: HttpRemote("http://sync.example.com", "alpha", token),
        lambda: HttpRemote(server.url, "alpha", token + " with space"),
    ]
    for case in cases:
        with pytest.raises((SyncEngineError, ValueError)) as info:
            case()
        text = "".join(traceback.format_exception(info.value)) + repr(info.value)
        if isinstance(info.value, SyncEngineError):
            text += repr(info.value.to_dict()) + info.value.one_line()
        assert token not in text, text
    remote = HttpRemote(server.url, "alpha", token)
    assert token not in repr(remote) and token not in repr(remote._session.auth)
    remote.close()


def test_a_token_file_others_can_read_or_a_symlink_is_refused(tmp_path: Path, monkeypatch):
    """A token file with group/other bits or behind a symlink is refused (exit 4), never read."""
    from syncengine.credentials import load_token, save_token
    from syncengine.errors import AuthError

    monkeypatch.delenv("SYNCENGINE_TOKEN", raising=False)
    path = tmp_path / "token"
    save_token(path, "s3cret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and load_token(path) == "s3cret"
    os.chmod(path, 0o640)
    with pytest.raises(AuthError, match="other users") as info:
        load_token(path)
    assert "s3cret" not in info.value.one_line()
    link = tmp_path / "link"
    os.chmod(path, 0o600)
    os.symlink(path, link)
    with pytest.raises(AuthError, match="not a regular file"):
        load_token(link)
