"""`syncengine token ...` and `syncengine serve` as an administrator runs them."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from syncengine.errors import AuthError
from syncengine.remote import HttpRemote
from tests.server.test_concurrency import _serve_cmd


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_token_create_prints_only_the_token_and_list_never_shows_it(tmp_path, capsys):
    """create prints the token alone on stdout; list (--json too) shows ids and prefixes only."""
    data = str(tmp_path / "srv")
    code, out, _ = _run(capsys, "token", "create", "--workspace", "alpha", "--data", data)
    token = out.strip()
    assert code == 0 and out == token + "\n" and len(token) >= 40
    code, listing, _ = _run(capsys, "token", "list", "--json", "--data", data)
    rows = json.loads(listing)
    assert code == 0 and rows[0]["workspace"] == "alpha" and rows[0]["revoked"] is None
    assert rows[0]["prefix"] == token[:6] and token not in listing
    code, human, _ = _run(capsys, "token", "list", "--data", data)
    assert rows[0]["id"] in human and token not in human
    _run(capsys, "token", "create", "-w", "alpha", "--label", "[laptop] ana", "--data", data)
    code, human, _ = _run(capsys, "token", "list", "--data", data)
    assert code == 0 and "[laptop] ana" in human  # a label is printed as it is, never as markup


def test_token_commands_refuse_bad_input_with_usage_errors(tmp_path, capsys):
    """A bad workspace name or unknown token id exits 2 with one line on stderr."""
    data = str(tmp_path / "srv")
    code, _, err = _run(capsys, "token", "create", "--workspace", "no spaces", "--data", data)
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "token", "revoke", "tok_nope", "--data", data)
    assert code == 2 and "tok_nope" in err


@pytest.mark.integration
def test_serve_with_a_token_from_the_cli_until_it_is_revoked(tmp_path, capsys):
    """A token made by `token create` opens the served workspace; after `token revoke` it fails."""
    data = str(tmp_path / "srv")
    _, out, _ = _run(capsys, "token", "create", "-w", "alpha", "--data", data)
    token = out.strip()
    with (
        _serve_cmd(["--data", data]) as url,
        HttpRemote(url, "alpha", token, backoff=0.01) as remote,
    ):
        assert remote.changes(0).last_seq == 0
        rows = json.loads(_run(capsys, "token", "list", "--json", "--data", data)[1])
        code, _, _ = _run(capsys, "token", "revoke", rows[0]["id"], "-w", "alpha", "--data", data)
        assert code == 0
        with pytest.raises(AuthError):
            remote.changes(0)
