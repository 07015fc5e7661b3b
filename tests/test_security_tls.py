"""TLS and plain HTTP, through the real CLI (RELIABILITY F4; DESIGN §6).

Certificates come from trustme: a private CA, a good certificate for
127.0.0.1, an expired one and one for another host. `syncengine sync`
must succeed only when the certificate is valid for the host and signed by
a CA it trusts (the system's, or ``server.ca_file``); every refusal is exit
3 with one line on stderr. Plain HTTP goes only to loopback, unless the
replica's config says ``allow_http = true``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from syncengine.config import Config
from tests.helpers import run_proc
from tests.replicas import ServeProcess

trustme = pytest.importorskip("trustme")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """PEM files: the CA, and (cert chain, key) pairs good / expired / for another host."""
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    now = dt.datetime.now(dt.UTC)
    certs = {
        "good": ca.issue_cert("127.0.0.1", "localhost"),
        "expired": ca.issue_cert("127.0.0.1", "localhost", not_before=now - dt.timedelta(days=30),
                                 not_after=now - dt.timedelta(days=1)),
        "wrong-host": ca.issue_cert("sync.example.org"),
        "untrusted": trustme.CA().issue_cert("127.0.0.1", "localhost"),
    }
    out = {"ca": folder / "ca.pem"}
    ca.cert_pem.write_to_path(str(out["ca"]))
    for name, cert in certs.items():
        out[f"{name}.crt"] = folder / f"{name}.crt"
        out[f"{name}.key"] = folder / f"{name}.key"
        cert.private_key_and_cert_chain_pem.write_to_path(str(out[f"{name}.crt"]))
        cert.private_key_pem.write_to_path(str(out[f"{name}.key"]))
    return out


def _replica(tmp_path: Path, name: str, url: str, token: str, **server: object) -> Path:
    """A workspace made by `syncengine init` with one file, then ``[server]`` settings written."""
    root = tmp_path / name
    root.mkdir()
    (root / f"{name}.txt").write_text(f"{name}\n")
    token_file = tmp_path / f"{name}.token"
    token_file.write_text(token)
    result = run_proc("init", root, "--server", url, "--workspace", "w", "--token-file", token_file)
    assert result.code == 0, result.stderr
    path = root / ".syncengine" / "config.toml"
    config = Config.load(path)
    for key, value in server.items():
        setattr(config.server, key, value)
    config.save(path)
    return root


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_serve_with_a_certificate_and_a_client_trusting_its_ca(tmp_path, pki):
    """`serve --certfile/--keyfile` serves HTTPS; a replica with ca_file syncs, one without is refused."""
    with ServeProcess(tmp_path / "data", tmp_path / "serve.log", "--certfile", str(pki["good.crt"]),
                      "--keyfile", str(pki["good.key"]), tls_ca=pki["ca"]) as server:
        token = server.token("w")
        trusting = _replica(tmp_path, "trusting", server.url, token, ca_file=str(pki["ca"]))
        result = run_proc("-C", trusting, "sync", "--json")
        assert result.code == 0, result.stderr
        assert result.json()["pushed"] == ["trusting.txt"]
        default = _replica(tmp_path, "default", server.url, token)
        result = run_proc("-C", default, "sync")
        assert result.code == 3
        line = _one_line(result.stderr)
        assert line.startswith("TLS error:") and "unable to get local issuer certificate" in line and "ca_file" in line
        assert not (default / ".syncengine" / "crash.log").exists()


@pytest.mark.parametrize("cert,reason", [("untrusted", "unable to get local issuer"),
                                          ("expired", "expired"),
                                          ("wrong-host", "mismatch, certificate is not valid for '127.0.0.1'")])
def test_a_bad_certificate_is_refused_even_with_the_ca_configured(server_factory, tmp_path, pki, cert, reason):
    """An unknown CA, an expired certificate or one for another host: exit 3, one line, nothing pushed."""
    server = server_factory(tls=(pki[f"{cert}.crt"], pki[f"{cert}.key"]))
    token = server.token("w")
    root = _replica(tmp_path, "r", server.url, token, ca_file=str(pki["ca"]))
    result = run_proc("-C", root, "sync")
    assert result.code == 3
    line = _one_line(result.stderr)
    assert line.startswith("TLS error:") and reason in line, line
    assert server.storage.changes(server.storage.workspace_id("w"), 0, 10)["last_seq"] == 0


def test_plain_http_beyond_loopback_needs_allow_http(server, tmp_path):
    """http:// to a host the client cannot prove is loopback is exit 2 unless allow_http = true.

    The host is written ``127.1``: numerically a loopback address, so the
    test's traffic stays on this machine, but not a name the client's
    loopback check accepts, which is the point.
    """
    token = server.token("w")
    url = f"http://127.1:{server.port}"
    refused = _replica(tmp_path, "refused", url, token)
    result = run_proc("-C", refused, "sync")
    assert result.code == 2
    assert _one_line(result.stderr).startswith("Insecure server URL: refusing plain HTTP to 127.1")
    for far in ("http://sync.example.com", "http://192.0.2.10:8765"):
        result = run_proc("-C", refused, "sync", env=_env(SYNCENGINE_SERVER=far))
        assert result.code == 2 and "Insecure server URL" in _one_line(result.stderr)
    allowed = _replica(tmp_path, "allowed", url, token, allow_http=True)
    result = run_proc("-C", allowed, "sync", "--json")
    assert result.code == 0, result.stderr
    assert result.json()["pushed"] == ["allowed.txt"]
    loopback = _replica(tmp_path, "loopback", server.url, token)
    assert run_proc("-C", loopback, "sync").code == 0


def _env(**extra: str) -> dict[str, str]:
    from tests.helpers import cli_env

    return cli_env(**extra)
