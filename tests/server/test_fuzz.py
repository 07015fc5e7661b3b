"""The protocol endpoints fuzzed from the server's own OpenAPI document (hypothesis).

Every operation the document lists is drawn, so a new endpoint is fuzzed
without anyone adding it here. Requests are built from the operation's
schemas — then bent: wrong types, missing keys, hostile paths, random bytes,
bad gzip, wrong or missing headers and tokens. Whatever arrives, the server
answers below 500 with a JSON ``{"error", "message"}`` on refusal, never a
traceback, never an error in its log; answers it accepts must pass the
client's own validators. Runs derandomized with a fixed budget.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import string
from typing import Any
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncengine import protocol as p
from tests.fixtures_server import RunningServer, StorageSpec
from tests.server.conftest import PROTO

pytestmark = pytest.mark.integration

FUZZ = settings(max_examples=600, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A server with one seeded workspace, its token, its blobs and documents, and an error catcher."""
    server = RunningServer(StorageSpec("sqlite", data_dir=tmp_path_factory.mktemp("fuzz"))).start()
    token = server.token("fuzz")
    other = server.token("other")
    session = requests.Session()
    session.headers.update({**PROTO, "Authorization": f"Bearer {token}"})
    blobs = [b"", b"a", b"some text\n", b"x" * 5000]
    for data in blobs:
        session.put(f"{server.url}/v1/ws/fuzz/blobs/{sha(data)}", data=data, timeout=10).raise_for_status()
    items = [p.CommitItem.make("seed", f"d{i}", f"dir/f{i}.txt", None, sha(data)) for i, data in enumerate(blobs)]
    session.post(f"{server.url}/v1/ws/fuzz/commit", json={"client_id": "seed", "items": [p.to_dict(i) for i in items]},
                 timeout=10).raise_for_status()
    errors = _Errors()
    loggers = [logging.getLogger(n) for n in ("syncengine.server", "uvicorn.error", "uvicorn.asgi")]
    for logger in loggers:
        logger.addHandler(errors)
    yield {"server": server, "session": session, "token": token, "other": other,
           "hashes": [sha(b) for b in blobs], "errors": errors, "ops": _operations(server)}
    for logger in loggers:
        logger.removeHandler(errors)
    session.close()
    server.stop()


def _operations(server: RunningServer) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    doc = requests.get(server.url + "/openapi.json", timeout=10).json()
    out = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            out.append((method.upper(), path, op, doc["components"]["schemas"]))
    return out


# ---------------------------------------------------------------- strategies

JSON_LEAF = st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=False) | st.text(
    max_size=20)
ANY_JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)
HEX64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
PATHS = st.sampled_from(["a.txt", "dir/f0.txt", "DIR/F0.TXT", "../x", "/etc/passwd", "a\x00b", "cafe\u0301",
                         ".syncengine/journal.db", "a//b", "", "x" * 300, "C:/x", "ok/deeper/file.md"]) | st.text(
    max_size=30)
def mostly(common: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """``common`` about nine times in ten, ``rare`` otherwise: deep code paths need well-formed envelopes."""
    return st.integers(0, 9).flatmap(lambda i: rare if i == 5 else common)


IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True) | st.sampled_from(
    ["d0", "d1", "d4", "seed"]) | st.text(max_size=10)


def _string(name: str | None, schema: dict[str, Any], hashes: list[str]) -> st.SearchStrategy:
    if name in ("hash", "op_id", "hashes", "sha256", "missing", "stored"):
        return mostly(st.sampled_from(hashes) | HEX64, st.text(max_size=70))
    if name in ("path", "old_path"):
        return PATHS
    if name in ("doc_id", "client_id", "after", "server_id"):
        return IDS
    return st.text(max_size=schema.get("maxLength", 40))


def from_schema(schema: dict[str, Any], comps: dict[str, Any], hashes: list[str], name: str | None = None,
                depth: int = 0) -> st.SearchStrategy:
    """Values a JSON Schema (the subset pydantic writes) allows, bent now and then into ones it does not."""
    if "$ref" in schema:
        return from_schema(comps[schema["$ref"].rsplit("/", 1)[-1]], comps, hashes, name, depth)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, comps, hashes, name, depth) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "object" and depth < 4:
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        fields = {k: from_schema(v, comps, hashes, k, depth + 1) for k, v in props.items()}
        valid = st.fixed_dictionaries({k: v for k, v in fields.items() if k in required},
                                      optional={k: v for k, v in fields.items() if k not in required})
        bent = st.dictionaries(st.sampled_from(sorted(props) or ["x"]), ANY_JSON, max_size=len(props) + 1)
        return mostly(valid, bent)
    if kind == "array" and depth < 4:
        inner = from_schema(schema.get("items", {}), comps, hashes, name, depth + 1)
        return mostly(st.lists(inner, max_size=6), st.lists(inner, min_size=99, max_size=102))
    if kind == "string":
        return _string(name, schema, hashes)
    if kind == "integer":
        return st.integers(min_value=schema.get("minimum"), max_value=schema.get("maximum")) | st.integers(
            -(2 ** 65), 2 ** 65)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return ANY_JSON


def _query_value(schema: dict[str, Any]) -> st.SearchStrategy:
    plain = st.text(alphabet=string.printable, max_size=20)
    if schema.get("type") == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum")).map(str) | st.integers().map(str) | plain
    return plain


def _pack_body(hashes: list[str]) -> st.SearchStrategy:
    def build(blobs: list[bytes], lie: int, tail: bytes) -> bytes:
        entries = [[sha(b), len(b) + (lie if i == 0 else 0)] for i, b in enumerate(blobs)]
        return json.dumps({"blobs": entries}).encode() + b"\n" + b"".join(blobs) + tail

    good = st.builds(build, st.lists(st.binary(max_size=64), max_size=4), st.sampled_from([0, 0, 0, 1, -1]),
                     st.sampled_from([b"", b"", b"extra"]))
    header = st.builds(lambda d: json.dumps(d).encode() + b"\n", ANY_JSON)
    return st.one_of(good, good, header, st.binary(max_size=200))


@st.composite
def requests_for(draw, target) -> tuple[str, str, dict[str, str], dict[str, Any], bytes | None]:
    method, path, op, comps = draw(st.sampled_from(target["ops"]))
    hashes = target["hashes"]
    url = path
    params: dict[str, str] = {}
    for param in op.get("parameters", []):
        if param["in"] == "path":
            if param["name"] == "ws":
                value = draw(mostly(st.just("fuzz"), st.sampled_from(["other", "nosuch", "..", "a b"]) | st.text(
                    max_size=12)))
            else:
                value = draw(_string(param["name"], param.get("schema", {}), hashes))
            url = url.replace("{" + param["name"] + "}", quote(value, safe="") or "%20")
        elif draw(st.booleans()):
            params[param["name"]] = draw(_query_value(param.get("schema", {})))
    if draw(st.integers(0, 9)) == 5:
        params[draw(st.sampled_from(["x", "token", "since"]))] = draw(st.text(string.ascii_letters, max_size=5))
    headers = {p.PROTOCOL_HEADER: draw(mostly(st.just("1"), st.sampled_from(["2", "", "one"])))}
    headers["Authorization"] = draw(mostly(st.just(f"Bearer {target['token']}"), st.sampled_from(
        [f"Bearer {target['other']}", "Bearer nope", "Basic eA==", ""])))
    body: bytes | None = None
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        value = draw(mostly(from_schema(content["application/json"]["schema"], comps, hashes), ANY_JSON))
        body = draw(mostly(st.just(json.dumps(value).encode()), st.binary(max_size=100)))
        headers["Content-Type"] = "application/json"
    elif p.PACK_MEDIA_TYPE in content:
        body = draw(_pack_body(hashes))
    elif content:
        body = draw(st.binary(max_size=3000) | st.sampled_from([b"", b"a", b"some text\n"]))
    if body is not None:
        encoding = draw(mostly(st.sampled_from(["identity", "gzip"]), st.sampled_from(["truncated", "br"])))
        if encoding == "gzip":
            body = gzip.compress(body)
        elif encoding == "truncated":
            body = gzip.compress(body)[:-5]
        if encoding != "identity":
            headers["Content-Encoding"] = "gzip" if encoding == "truncated" else encoding
    return method, url, headers, params, body


_ANSWERS = {
    "/v1/health": p.Health.from_dict,
    "/v1/ws/{ws}/changes": p.ChangesPage.from_dict,
    "/v1/ws/{ws}/docs": p.DocsPage.from_dict,
    "/v1/ws/{ws}/blobs/missing": p.MissingResponse.from_dict,
    "/v1/ws/{ws}/blobs/pack": p.PackResponse.from_dict,
    "/v1/ws/{ws}/commit": p.CommitResponse.from_dict,
}


def _check_answer(path_template: str, r: requests.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    assert b"Traceback" not in r.content
    if r.status_code >= 400:
        body = r.json()
        assert set(body) >= {"error", "message"} and body["error"] in p.ERROR_CODES, body
        return
    parse = _ANSWERS.get(path_template)
    if parse is not None and r.status_code == 200:
        parse(r.json())  # what the server says, the client's validators accept


def test_the_openapi_operations_are_all_fuzzed(target):
    """The fuzzer draws from the OpenAPI document itself: every /v1 operation is in its pool."""
    drawn = {(m, path) for m, path, _op, _c in target["ops"]}
    assert {("GET", "/v1/health"), ("POST", "/v1/ws/{ws}/commit"), ("PUT", "/v1/ws/{ws}/blobs/{sha256}")} <= drawn
    assert all(path.startswith("/v1/") or path == "/openapi.json" for _m, path in drawn)


@FUZZ
@given(data=st.data())
def test_no_request_makes_the_server_fail(target, data):
    """Any request built from (or bent away from) the OpenAPI schemas gets a JSON answer below 500."""
    method, url, headers, params, body = data.draw(requests_for(target))
    template = next(path for m, path, _op, _c in target["ops"] if m == method and _matches(path, url))
    r = target["session"].request(method, target["server"].url + url, headers=headers, params=params,
                                  data=body, timeout=30)
    _check_answer(template, r)
    assert not target["errors"].records, target["errors"].records[0].getMessage()


def _matches(template: str, url: str) -> bool:
    t_parts, u_parts = template.split("/"), url.split("/")
    return len(t_parts) == len(u_parts) and all(t == u or t.startswith("{") for t, u in zip(t_parts, u_parts,
                                                                                             strict=True))


def _valid_items(hashes: list[str]) -> st.SearchStrategy:
    item = st.builds(
        lambda doc, path, base, digest, exe: p.CommitItem.make("fz", doc, path, base, digest, exe),
        st.sampled_from([f"d{i}" for i in range(8)]),
        st.sampled_from(["a.txt", "A.TXT", "dir/f0.txt", "dir/F1.txt", "b/c.md", "new.bin"]),
        st.none() | st.integers(1, 40),
        st.none() | st.sampled_from(hashes) | HEX64,
        st.booleans(),
    )
    return st.lists(item, max_size=12)


@settings(max_examples=150, derandomize=True, deadline=None, database=None)
@given(data=st.data())
def test_well_formed_commits_keep_the_log_valid(target, data):
    """Random well-formed commits (CAS misses, moves, case clashes, deletes) never 500 and keep the feed valid."""
    items = data.draw(_valid_items(target["hashes"]))
    session, url = target["session"], target["server"].url + "/v1/ws/fuzz"
    r = session.post(url + "/commit", json={"client_id": "fz", "items": [p.to_dict(i) for i in items]}, timeout=30)
    assert r.status_code == 200, r.text
    results = p.CommitResponse.from_dict(r.json(), expected=len(items)).results
    assert all(res.doc_id == item.doc_id for res, item in zip(results, items, strict=True))
    page = p.ChangesPage.from_dict(session.get(url + "/changes", params={"since": 0, "limit": 1000},
                                               timeout=30).json(), since=0)
    docs = p.DocsPage.from_dict(session.get(url + "/docs", params={"limit": 1000}, timeout=30).json())
    keys = [d.path.casefold() for d in docs.docs]
    assert len(keys) == len(set(keys)), "two live documents collide by case"
    assert page.last_seq == docs.last_seq and not target["errors"].records
