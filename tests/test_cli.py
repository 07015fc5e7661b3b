"""The CLI contract: commands, --json, exit codes, one-line errors, crash log."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import click
import pytest

from cli.main import COMMANDS, LazyGroup, _register, cli
from tests.helpers import cli_env, run_cli, run_proc


@pytest.fixture
def ws_root(sample_tree: Path) -> Path:
    result = run_cli("init", sample_tree)
    assert result.code == 0, result.stderr
    return sample_tree


def test_init_creates_the_state_folder(ws_root: Path):
    """init makes .syncengine/ with a WAL journal, objects/ and config.toml."""
    state = ws_root / ".syncengine"
    assert (state / "config.toml").is_file() and (state / "objects").is_dir()
    with sqlite3.connect(state / "journal.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 1


def test_init_twice_is_refused(ws_root: Path):
    """A second init on the same folder exits 5 with one line."""
    result = run_cli("init", ws_root)
    assert result.code == 5
    assert result.stderr.count("\n") == 1 and "already a workspace" in result.stderr


def test_init_json_reports_files(sample_tree: Path):
    """init --json prints one JSON document with the number of files recorded."""
    result = run_cli("init", sample_tree, "--json")
    assert result.code == 0
    assert result.json()["files"] == 28


def test_status_json_from_a_subfolder(ws_root: Path):
    """status works from any folder inside the workspace and reports pending changes by kind."""
    (ws_root / "notes" / "new.md").write_text("new\n")
    result = run_cli("-C", ws_root / "invoices", "status", "--json")
    assert result.code == 0, result.stderr
    data = result.json()
    assert data["root"] == str(ws_root)
    assert data["pending"]["created"] == 29
    assert data["conflicts"] == [] and data["last_snapshot"] is None


def test_status_human_output(ws_root: Path):
    """status without --json prints a readable summary."""
    result = run_cli("-C", ws_root, "status")
    assert result.code == 0
    assert "Pending sync: 28 created" in result.stdout and "Last snapshot: none" in result.stdout


def test_status_flags_a_pending_document_that_does_not_parse(ws_root: Path):
    """A half-typed JSON/YAML file is named in status (text and --json) with the line it breaks on."""
    (ws_root / "half.json").write_text('{"zones": [\n')
    (ws_root / "dup.yaml").write_text("a: 1\na: 2\n")  # duplicate keys: a merge would lose one
    (ws_root / "fine.json").write_text('{"ok": true}\n')
    (ws_root / "notes.txt").write_text('{"not json": \n')  # text: nothing to parse
    data = run_cli("-C", ws_root, "status", "--json").json()
    flagged = {e["path"]: e["reason"] for e in data["errors"]}
    assert set(flagged) == {"half.json", "dup.yaml"}, flagged
    assert "does not parse as JSON" in flagged["half.json"] and "line 2" in flagged["half.json"]
    assert "keeps both versions" in flagged["dup.yaml"]
    human = run_cli("-C", ws_root, "status")
    assert human.code == 0 and "! half.json: does not parse as JSON" in human.stdout


def test_outside_a_workspace_exits_5(tmp_path: Path):
    """Any workspace command outside a workspace exits 5 with one clear line."""
    for command in (["status"], ["log"], ["diff"], ["snapshot"], ["snapshots"], ["restore", "1"]):
        result = run_cli("-C", tmp_path, *command)
        assert result.code == 5, (command, result.stderr)
        assert result.stderr.count("\n") == 1 and "not inside a syncengine workspace" in result.stderr
        assert "Traceback" not in result.stderr


def test_bad_flag_exits_2_with_one_line(ws_root: Path):
    """An unknown option is a usage error: exit 2, one line, no traceback."""
    result = run_cli("-C", ws_root, "status", "--bogus")
    assert result.code == 2
    assert result.stderr.count("\n") == 1 and "--bogus" in result.stderr


def test_snapshot_restore_round_trip_via_cli(ws_root: Path):
    """snapshot, edit, restore by id through the CLI gives the old bytes back."""
    todo = ws_root / "notes" / "todo.md"
    before = todo.read_bytes()
    snap = run_cli("-C", ws_root, "snapshot", "-m", "first", "--json").json()
    todo.write_text("scribbled")
    result = run_cli("-C", ws_root / "notes", "restore", str(snap["id"]), "todo.md", "--json")
    assert result.code == 0, result.stderr
    assert result.json()["written"] == ["notes/todo.md"]
    assert todo.read_bytes() == before
    listing = run_cli("-C", ws_root, "snapshots", "--json").json()
    assert [s["trigger"] for s in listing] == ["safety", "manual"]


def test_restore_unknown_snapshot_is_a_usage_error(ws_root: Path):
    """restore of a snapshot that does not exist exits 2 and changes nothing."""
    result = run_cli("-C", ws_root, "restore", "99")
    assert result.code == 2 and "no snapshot" in result.stderr


def test_log_and_diff_json(ws_root: Path):
    """log --json and diff --json print one JSON document each."""
    run_cli("-C", ws_root, "snapshot")
    (ws_root / "notes" / "todo.md").write_text("# To do\n")
    log = run_cli("-C", ws_root, "log", "-n", "1", "--json").json()
    assert log[0]["op"] == "modified" and log[0]["path"] == "notes/todo.md"
    diff = run_cli("-C", ws_root, "diff", "notes/todo.md", "--json").json()
    assert diff[0]["status"] == "modified" and diff[0]["unified"]


def test_damaged_journal_exits_5_naming_repair_and_repair_fixes_it(ws_root: Path):
    """A garbage journal.db gives exit 5 naming `syncengine repair`; repair rebuilds it with no base."""
    journal = ws_root / ".syncengine" / "journal.db"
    for suffix in ("-wal", "-shm"):
        Path(str(journal) + suffix).unlink(missing_ok=True)
    journal.write_bytes(b"this is not a database" * 100)
    result = run_cli("-C", ws_root, "status")
    assert result.code == 5
    assert "syncengine repair" in result.stderr and result.stderr.count("\n") == 1
    repaired = run_cli("-C", ws_root, "repair", "--json")
    assert repaired.code == 0, repaired.stderr
    data = repaired.json()
    assert data["integrity"] == "damaged" and data["files"] == 28 and data["moved_aside"]
    assert Path(data["moved_aside"]).exists()
    assert run_cli("-C", ws_root, "status").code == 0


def test_truncated_journal_is_detected(ws_root: Path):
    """A journal cut in half is reported as damaged (exit 5), not as an internal error."""
    run_cli("-C", ws_root, "snapshot")  # make the file bigger than its header
    journal = ws_root / ".syncengine" / "journal.db"
    with sqlite3.connect(journal) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = journal.read_bytes()
    journal.write_bytes(data[:4096] + b"\xff" * (len(data) - 4096))
    result = run_cli("-C", ws_root, "log")
    assert result.code == 5, result.stderr


def test_repair_on_a_healthy_journal_changes_nothing(ws_root: Path):
    """repair on a healthy journal says so and moves nothing."""
    result = run_cli("-C", ws_root, "repair", "--json")
    assert result.code == 0 and result.json()["integrity"] == "ok"
    assert not list((ws_root / ".syncengine").glob("journal.db.damaged-*"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_blob_store_exits_5_naming_repair_and_repair_stores_the_files_again(ws_root: Path, damage):
    """A damaged objects/small.db: exit 5 naming repair, nothing written; repair sets it aside, stores the
    current files again (so the latest snapshot restores), and names the versions only it held as lost."""
    assert run_cli("-C", ws_root, "snapshot", "-m", "first").code == 0
    todo = ws_root / "notes" / "todo.md"
    first = todo.read_bytes()
    todo.write_bytes(first + b"- an edit the damaged store held\n")
    assert run_cli("-C", ws_root, "snapshot", "-m", "second").code == 0
    todo.write_bytes(first)
    table = ws_root / ".syncengine" / "objects" / "small.db"
    with sqlite3.connect(table) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for suffix in ("-wal", "-shm"):
        Path(f"{table}{suffix}").unlink(missing_ok=True)
    data = table.read_bytes()
    table.write_bytes(b"this is not a database" * 100 if damage == "garbage" else data[:100] + b"\xff" * 20000)
    before = run_cli("-C", ws_root, "snapshots", "--json").json()
    result = run_cli("-C", ws_root, "snapshot", "-m", "third")
    assert result.code == 5 and "syncengine repair" in result.stderr and result.stderr.count("\n") == 1
    assert run_cli("-C", ws_root, "snapshots", "--json").json() == before  # nothing recorded

    repaired = run_cli("-C", ws_root, "repair", "--json")
    assert repaired.code == 0, repaired.stderr
    report = repaired.json()
    assert report["integrity"] == "ok" and report["blobs"] == "damaged"
    assert Path(report["blobs_moved_aside"]).exists() and report["blobs_restored"] >= 20
    assert report["blobs_lost"] == 1  # the edit only the second snapshot held
    assert run_cli("-C", ws_root, "repair", "--json").json()["blobs"] == "ok"  # healthy now
    assert run_cli("-C", ws_root, "snapshot", "-m", "third").code == 0
    todo.write_bytes(b"scribbled over\n")
    assert run_cli("-C", ws_root, "restore", "1", "notes/todo.md").code == 0  # its bytes were stored again
    assert todo.read_bytes() == first
    lost = run_cli("-C", ws_root, "restore", "2", "notes/todo.md")
    assert lost.code == 8 and "missing" in lost.stderr and todo.read_bytes() == first


def test_unexpected_exception_exits_70_with_traceback_in_crash_log(ws_root: Path):
    """An internal error prints one line, exits 70, and writes the traceback to crash.log."""
    env = cli_env(SYNCENGINE_FAILPOINT="status.start=raise")
    result = run_proc("-C", ws_root, "status", env=env)
    assert result.code == 70
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    crash = (ws_root / ".syncengine" / "crash.log").read_text()
    assert "Traceback" in crash and "failpoint status.start reached" in crash


def test_token_is_never_taken_from_argv():
    """init has no option that takes a token value on the command line."""
    init = cli.get_command(click.Context(cli), "init")
    assert not [p for p in init.params if isinstance(p, click.Option) and "--token" in p.opts]


def test_init_stores_token_from_stdin_with_mode_600(tmp_path: Path):
    """--token-file - reads the token from stdin and stores it readable by the owner only."""
    root = tmp_path / "t"
    result = run_cli("init", root, "--server", "http://127.0.0.1:9", "--workspace", "w",
                     "--token-file", "-", input="s3cret-token\n")
    assert result.code == 0, result.stderr
    token = root / ".syncengine" / "token"
    assert token.read_text().strip() == "s3cret-token"
    assert os.stat(token).st_mode & 0o777 == 0o600
    assert "s3cret" not in result.stdout + result.stderr


def test_every_command_has_help_and_is_documented():
    """Each command answers --help and appears in the README's CLI tour or docs/cli.md."""
    from tests.helpers import REPO

    docs = (REPO / "README.md").read_text() + (REPO / "docs" / "cli.md").read_text()
    for name in COMMANDS:
        result = run_cli(name, "--help")
        assert result.code == 0 and "Usage:" in result.stdout, name
        assert f"syncengine {name}" in docs, f"{name} is not documented"


def test_json_output_is_one_document(ws_root: Path):
    """--json output parses as exactly one JSON document."""
    out = run_cli("-C", ws_root, "snapshots", "--json").stdout
    json.loads(out)


def test_log_path_and_limit_from_a_subfolder(ws_root: Path):
    """`log PATH` is relative to the current folder and shows that document only; -n caps the entries."""
    notes = ws_root / "notes"
    for n in range(3):
        (notes / "todo.md").write_text(f"# To do\n\n- step {n}\n")
        assert run_cli("-C", notes, "status").code == 0
    entries = run_cli("-C", notes, "log", "todo.md", "--json").json()
    assert {e["path"] for e in entries} == {"notes/todo.md"}
    assert [e["op"] for e in entries] == ["modified"] * 3 + ["created"]
    assert len(run_cli("-C", notes, "log", "todo.md", "-n", "2", "--json").json()) == 2
    assert len(run_cli("-C", ws_root, "log", "-n", "5", "--json").json()) == 5


def test_diff_yaml_toml_fields_and_since_through_the_cli(ws_root: Path):
    """YAML and TOML diff field by field; --since compares with an older snapshot; PATH narrows it."""
    first = run_cli("-C", ws_root, "snapshot", "--json").json()["id"]
    labels = ws_root / "config" / "labels.yaml"
    labels.write_text(labels.read_text().replace("'#ee551e'", "'#000000'", 1))
    run_cli("-C", ws_root, "snapshot")
    export = ws_root / "config" / "export.toml"
    export.write_text(export.read_text().replace("indent = 2", "indent = 4"))
    recent = run_cli("-C", ws_root / "config", "diff", "--json").json()
    assert [d["path"] for d in recent] == ["config/export.toml"]
    assert [(f["path"], f["old"], f["new"]) for f in recent[0]["fields"]] == [("export.indent", 2, 4)]
    since = run_cli("-C", ws_root / "config", "diff", "--since", str(first), "--json").json()
    assert [d["path"] for d in since] == ["config/export.toml", "config/labels.yaml"]
    fields = {f["path"]: (f["old"], f["new"]) for f in since[1]["fields"]}
    assert list(fields.values()) == [("#ee551e", "#000000")] and "color" in next(iter(fields))
    only = run_cli("-C", ws_root / "config", "diff", "labels.yaml", "--since", str(first), "--json").json()
    assert [d["path"] for d in only] == ["config/labels.yaml"]
    human = run_cli("-C", ws_root, "diff", "--since", str(first))
    assert human.code == 0 and "config/labels.yaml" in human.stdout and "#000000" in human.stdout


def test_names_with_brackets_are_printed_as_they_are(tmp_path: Path):
    """A path or message like `notes [draft].md` is shown verbatim, never read as terminal markup."""
    from syncengine.testing import make_tree

    root = tmp_path / "br"
    names = ["notes [draft].md", "[red]x[i].md", "d [b]/y[link=z].txt"]
    make_tree(root, {name: f"{n}\n" for n, name in enumerate(names)})
    outputs = [run_cli("init", root).stdout, run_cli("-C", root, "status").stdout,
               run_cli("-C", root, "log").stdout]
    outputs.append(run_cli("-C", root, "snapshot", "-m", "[bold]before[/] [draft]").stdout)
    outputs.append(run_cli("-C", root, "snapshots").stdout)
    for name in names:
        (root / name).write_text("edited\n")
    outputs += [run_cli("-C", root, "status").stdout, run_cli("-C", root, "diff").stdout]
    outputs.append(run_cli("-C", root, "restore", "latest").stdout)
    text = "\n".join(outputs)
    for name in names:
        assert text.count(name) >= 5, (name, text)
    assert "[bold]before[/] [draft]" in text


@pytest.mark.parametrize("text", ["[server\n", '[sync]\nmax_delete = "lots"\n'], ids=["not-toml", "wrong-type"])
def test_a_malformed_config_exits_2_naming_the_file(ws_root: Path, text: str):
    """A config.toml that is not TOML or holds a wrong type: exit 2, one line naming it; nothing is touched."""
    config = ws_root / ".syncengine" / "config.toml"
    config.write_text(text)
    for command in (["status"], ["sync"], ["snapshot"]):
        result = run_cli("-C", ws_root, *command)
        assert result.code == 2, (command, result.stderr)
        assert result.stderr.count("\n") == 1 and "config.toml" in result.stderr
    assert config.read_text() == text


def test_the_command_table_matches_the_commands():
    """cli.main.COMMANDS names every command, where it lives and its short help, exactly as the command says."""
    _register()
    assert set(COMMANDS) == set(cli.commands)
    for name, (module, short) in COMMANDS.items():
        cmd = cli.commands[name]
        assert cmd.callback.__module__ == module, name
        assert cmd.get_short_help_str(10**6) == short, f"COMMANDS[{name!r}] is stale: {cmd.get_short_help_str(10**6)}"


def test_help_from_the_table_is_clicks_own_listing():
    """`--help` rendered from the table, nothing imported, reads exactly as click renders the loaded commands."""
    _register()
    lazy = LazyGroup(name="syncengine", lazy=COMMANDS)
    for width in (60, 80, 100):
        ours = click.HelpFormatter(width=width)
        lazy.format_commands(click.Context(lazy), ours)
        clicks = click.HelpFormatter(width=width)
        click.Group.format_commands(cli, click.Context(cli), clicks)
        assert not lazy.commands
        assert ours.getvalue() == clicks.getvalue() and "token" in ours.getvalue()


def test_an_unknown_command_is_a_usage_error():
    """A mistyped command exits 2 with one line, as before commands were loaded lazily."""
    result = run_cli("stauts")
    assert result.code == 2 and "No such command" in result.stderr and result.stderr.count("\n") == 1
