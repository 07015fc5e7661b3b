"""Start-up cost: a `syncengine` call imports only what its command needs.

Every call is a fresh Python process, so what it imports is paid on every
`status` and every no-op `sync`. These tests run the real CLI as a
subprocess and look at the modules it ended with, never at a time.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env

# The server's (its PostgreSQL driver included), the daemon's, the terminal's and the config writer's stacks.
NEVER_FOR_A_CLIENT = ("fastapi", "uvicorn", "starlette", "psycopg2", "watchdog", "websockets", "deepdiff", "ruamel",
                      "rich", "tomlkit")
# What a round loads only when it has something to apply or push (and status only to show a snapshot),
# the blob store's stack (ctypes, subprocess, its SQLite table), loaded by what reads or writes blobs,
# the values other commands show (syncengine.views: 13 dataclasses, ~10 ms to create), the merge stack
# (merge, merge_text, merge3), which only a conflict or a .syncrules with field rules needs, and the wire
# messages that move content (syncengine.exchange: 13 dataclasses, ~7 ms), with the download's thread pool and
# the upload's gzip; the strategies' module (a round settles nothing) and .syncrules' (a workspace without one).
NOT_FOR_A_NO_OP = ("syncengine.apply", "syncengine.applier", "syncengine.staging", "syncengine.push",
                   "syncengine.history", "syncengine.blobs", "syncengine.chunkindex", "syncengine.durable",
                   "syncengine.views", "syncengine.merge", "syncengine.merge_text", "merge3", "syncengine.exchange",
                   "concurrent.futures", "gzip", "syncengine.conflicts", "syncengine.rules")
COMMAND_MODULES = ("cli.workspace_cmds", "cli.sync_cmds", "cli.history", "cli.conflict_cmds", "cli.server_cmds",
                   "cli.daemon_cmds")

_PROBE = """
import atexit, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write("\\n".join(sorted(sys.modules))))
from cli.main import run
sys.argv[0] = "syncengine"
run()
"""


def imported_by(tmp_path: Path, *args: str | Path, **env: str) -> tuple[int, set[str]]:
    """Run `syncengine ARGS` in a fresh process; its exit code and every module it had loaded at exit."""
    code, modules, _stdout = run_probe(tmp_path, *args, **env)
    return code, modules


def run_probe(tmp_path: Path, *args: str | Path, **env: str) -> tuple[int, set[str], str]:
    """`syncengine ARGS` with stdout on a pipe: exit code, modules loaded at exit, and what it printed."""
    out = tmp_path / "modules.txt"
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(out), *map(str, args)], capture_output=True,
                          text=True, env=cli_env(**env), cwd=REPO, timeout=120)
    assert out.exists(), proc.stderr
    return proc.returncode, set(out.read_text().split()), proc.stdout


_COLLECTOR_PROBE = """
import atexit, gc, sys
out = sys.argv.pop(1)
seen = {"during_start_up": 0, "before_run": 0, "after": 0}
def count(phase, info):
    if phase == "start":
        seen["after" if gc.get_freeze_count() else "during_start_up" if started else "before_run"] += 1
started = False
gc.callbacks.append(count)
atexit.register(lambda: open(out, "w").write(repr((seen, gc.isenabled(), gc.get_freeze_count() > 0,
                                                   "syncengine.sync" in sys.modules))))
gc.set_threshold(100)  # young collections seven times as often as by default: none slips through unseen
from cli.main import run
sys.argv[0] = "syncengine"
started = True
run()
"""


def collections_of(tmp_path: Path, *args: str | Path) -> tuple[int, tuple[dict[str, int], bool, bool, bool]]:
    """Run `syncengine ARGS` counting the collector's runs before `run()`, during start-up and after it."""
    out = tmp_path / "collector.txt"
    proc = subprocess.run([sys.executable, "-c", _COLLECTOR_PROBE, str(out), *map(str, args)], capture_output=True,
                          text=True, env=cli_env(), cwd=REPO, timeout=120)
    assert out.exists(), proc.stderr
    return proc.returncode, eval(out.read_text())


def test_start_up_imports_run_without_the_collector_which_runs_for_the_command(tmp_path: Path, sample_ws):
    """A CLI process pauses the collector while it imports its command's stacks (objects that live until exit:
    ~11 ms of young collections for nothing in a no-op sync), then freezes them and collects as usual, so a
    long command (daemon, serve, a big sync) still has its collector. `sync` imports its round with the command."""
    for args in (("status", "--json"), ("sync", "--json")):
        code, (seen, enabled, frozen, round_loaded) = collections_of(tmp_path, "-C", sample_ws.root, *args)
        assert code in (0, 2), (args, code)  # sync: no server configured -> a usage error, after start-up
        assert seen["before_run"] > 0 and seen["during_start_up"] == 0, (args, seen)
        assert enabled and frozen, args
        assert round_loaded == (args[0] == "sync")


def test_loading_commands_in_a_process_leaves_its_collector_alone():
    """Only `run` (a CLI process) pauses the collector: importing and loading commands in-process does not."""
    import gc

    from cli.main import _register

    frozen = gc.get_freeze_count()
    _register()
    assert gc.isenabled() and gc.get_freeze_count() == frozen


# The modules of values a command creates at import (dataclasses), in this file's sense of start-up cost.
VALUE_MODULES = ("syncengine.models", "syncengine.views", "syncengine.reports", "syncengine.config",
                 "syncengine.protocol", "syncengine.exchange", "syncengine.remote", "syncengine.reconcile",
                 "syncengine.conflicts", "syncengine.rules", "syncengine.chunked", "syncengine.docdiff")


@pytest.mark.parametrize("name", VALUE_MODULES)
def test_every_dataclass_of_a_command_has_its_own_docstring(name: str):
    """A dataclass without a docstring gets one from inspect.signature when it is created (~0.1 ms each, paid
    at every start: 23 of the 30 a `status` created had none)."""
    import dataclasses
    import importlib

    module = importlib.import_module(name)
    made = [value for value in vars(module).values() if isinstance(value, type) and dataclasses.is_dataclass(value)
            and value.__module__ == name]
    assert made
    assert not [cls.__name__ for cls in made if (cls.__doc__ or "").startswith(f"{cls.__name__}(")]


# Reports and shown values: read field by field, never compared whole, so created without __eq__ (and __hash__).
SHOWN_NOT_COMPARED = ("syncengine.models.ScanReport", "syncengine.models.ConflictInfo", "syncengine.models.InitReport",
                      "syncengine.models.PlannedAction", "syncengine.models.SyncReport", "syncengine.views.Status",
                      "syncengine.views.SnapshotInfo", "syncengine.views.PendingCounts", "syncengine.views.PendingItem",
                      "syncengine.views.TaskInfo", "syncengine.views.DaemonInfo", "syncengine.views.SyncInfo",
                      "syncengine.conflicts.Outcome", "syncengine.rules.Rule", "syncengine.rules.Rules",
                      "syncengine.protocol.RejectedItem")


def test_values_only_shown_are_created_without_eq():
    """Each generated __eq__ (with its __hash__ when frozen) costs ~0.09 ms of every start: the values that are
    only shown have none; the facts a round reasons with (LocalChange, ScanProblem, Version) keep theirs."""
    import importlib

    for qualified in SHOWN_NOT_COMPARED:
        module, name = qualified.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        assert "__eq__" not in vars(cls) and "__hash__" not in vars(cls), qualified
    from syncengine.models import LocalChange, ScanProblem
    from syncengine.reconcile import Version

    assert ScanProblem("a", "b") == ScanProblem("a", "b") and Version("a", None) == Version("a", None)
    assert LocalChange("created", "a") == LocalChange("created", "a")


def dataclasses_made(modules: set[str]) -> set[str]:
    """The dataclasses the project's modules among ``modules`` create when imported (module.Class)."""
    import dataclasses
    import importlib

    made = set()
    for name in sorted(m for m in modules if m.split(".")[0] in ("syncengine", "cli")):
        for value in vars(importlib.import_module(name)).values():
            if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == name:
                made.add(f"{name}.{value.__name__}")
    return made


# The dataclasses a process creates before it does anything (~0.35-1 ms each, mostly compiling their generated
# methods): what a `status` and a no-op `sync` may create at most, and some they did once and need not.
STATUS_DATACLASSES = 24
NO_OP_SYNC_DATACLASSES = 29
NOT_CREATED = {"syncengine.protocol.Health", "syncengine.exchange.Health", "syncengine.models.FieldChange",
               "syncengine.docdiff.FieldChange", "syncengine.reports.LogEntry", "syncengine.reports.Event"}


def _tops(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_help_imports_no_command_module_and_no_engine(tmp_path: Path):
    """`--help` lists every command from the table in cli.main: no command module, no engine, no rich."""
    code, modules = imported_by(tmp_path, "--help")
    assert code == 0
    assert not modules & set(COMMAND_MODULES)
    assert "syncengine.engine" not in modules and "peewee" not in modules
    assert not _tops(modules) & set(NEVER_FOR_A_CLIENT)


@pytest.mark.integration
def test_status_and_sync_json_import_only_their_own_stack(tmp_path: Path, kit):
    """`status --json` and `sync --json` in a synced workspace load their one command module and none of the
    server, daemon, terminal-rendering or config-writing libraries; status does not load the HTTP client, nor
    the blob store."""
    replica = kit.replica({"a.json": '{"x": 1}\n', "notes/b.md": "# b\n"})
    code, modules = imported_by(tmp_path, "-C", replica.root, "sync", "--json")
    assert code == 0
    assert not _tops(modules) & set(NEVER_FOR_A_CLIENT), sorted(_tops(modules) & set(NEVER_FOR_A_CLIENT))
    assert set(COMMAND_MODULES) & modules == {"cli.sync_cmds", "cli.workspace_cmds"}
    assert "syncengine.server" not in modules and "syncengine.daemon" not in modules
    assert "pathspec" not in _tops(modules)  # neither .syncignore nor .syncrules

    code, modules = imported_by(tmp_path, "-C", replica.root, "status", "--json")
    assert code == 0
    assert not _tops(modules) & {*NEVER_FOR_A_CLIENT, "requests", "urllib3", "merge3", "pathspec"}  # no .syncignore
    assert set(COMMAND_MODULES) & modules == {"cli.workspace_cmds"}
    assert "syncengine.remote" not in modules and "syncengine.merge" not in modules
    # It shows the last sync's time (history.iso), not a snapshot: the blob store's stack stays unloaded.
    assert not modules & {"syncengine.blobs", "syncengine.durable", "ctypes", "syncengine.protocol"}
    # Its values (syncengine.views), not those of log, diff, restore, repair and events (5 dataclasses, ~2 ms).
    assert "syncengine.views" in modules and "syncengine.reports" not in modules
    assert "subprocess" not in modules  # the daemon's state is read from files: only starting it spawns
    assert not modules & {"secrets", "random", "hmac"}  # fsops' temp names: os.urandom, as secrets would
    assert not modules & {"shutil", "bz2", "lzma"}  # only a repair or a trash recovery moves or removes trees
    made = dataclasses_made(modules)
    assert len(made) <= STATUS_DATACLASSES and not made & NOT_CREATED, sorted(made)


def test_a_round_that_only_pushes_does_not_load_the_apply_stack(tmp_path: Path, kit):
    """Local edits, a creation and a deletion go up without syncengine.apply (its staging, its leftovers):
    planning them needs reconcile's versions() only; the push's own stack is loaded, as it must be."""
    replica = kit.replica({"a.json": '{"x": 1}\n', "notes/b.md": "# b\n", "c.txt": "c\n"})
    (replica.root / "a.json").write_text('{"x": 2}\n')
    (replica.root / "new.md").write_text("# new\n")
    (replica.root / "c.txt").unlink()
    code, modules = imported_by(tmp_path, "-C", replica.root, "sync", "--json")
    assert code == 0
    assert "syncengine.push" in modules
    assert not modules & {"syncengine.apply", "syncengine.applier", "syncengine.staging"}


def test_init_writes_its_config_without_tomlkit(tmp_path: Path, sample_tree: Path):
    """`init` writes config.toml by hand (Config.to_toml): tomlkit is only for editing a user's TOML document.
    Its report is one of the values a scan and a round use (syncengine.models), not of syncengine.views."""
    code, modules = imported_by(tmp_path, "init", sample_tree, "--server", "http://127.0.0.1:9", "--workspace", "w")
    assert code == 0 and (sample_tree / ".syncengine" / "config.toml").is_file()
    assert not _tops(modules) & set(NEVER_FOR_A_CLIENT), sorted(_tops(modules) & set(NEVER_FOR_A_CLIENT))
    assert "syncengine.views" not in modules


def test_a_human_status_on_a_pipe_prints_plain_text_without_rich(tmp_path: Path, sample_ws):
    """On a pipe a person's output is plain text, written without rich (~45 ms of imports); what rich would
    print for the same lines on a pipe, and rich itself once something asks for a terminal (TTY_COMPATIBLE)."""
    code, modules, plain = run_probe(tmp_path, "-C", sample_ws.root, "status", TTY_COMPATIBLE="")
    assert code == 0 and "rich" not in _tops(modules)
    assert plain.startswith(f"Workspace {sample_ws.root}: ") and "Pending sync: 28 created" in plain

    code, modules, styled = run_probe(tmp_path, "-C", sample_ws.root, "status", TTY_COMPATIBLE="1")
    assert code == 0 and "rich.console" in modules
    assert "\x1b[" in styled and _strip_ansi(styled) == plain


def test_a_table_on_a_pipe_still_renders_with_rich(tmp_path: Path, sample_ws):
    """A renderable that is not one line of text (`log`'s table) loads rich when it prints, and only then."""
    code, modules, out = run_probe(tmp_path, "-C", sample_ws.root, "log", TTY_COMPATIBLE="")
    assert code == 0 and "rich.table" in modules and out


_MARKUP = ["plain", "a [bold]b[/] c", "[yellow]! x: y[/]", "p[1].json", "odd \\[bold] literal", "ends\\",
           "ends\\\\", "x \\\\[bold]y[/]", "[dim](detail)[/]", "tab\there", "bell\x07cr\r", "[#ff0000]red[/]",
           "a [b c]", "[bold red]x[/bold red] [link=http://a]l[/link]", "  lead", "trail  ", "ünï 中文", "[[x]]",
           "a ]b[ c", "x\ny"]


@pytest.mark.parametrize("text", _MARKUP)
def test_plain_console_prints_what_rich_prints_on_a_pipe(text: str, capsys):
    """PlainConsole and escape() follow rich's markup rules: the same bytes as rich's Console on a pipe."""
    from rich.console import Console
    from rich.markup import escape as rich_escape

    from cli.render import PlainConsole, escape

    assert escape(text) == rich_escape(text)
    for markup in (text, escape(text), f"[bold]{escape(text)}[/]"):
        for as_markup in (True, False):
            rich_out = io.StringIO()
            Console(file=rich_out, highlight=False, soft_wrap=True, width=200).print(markup, markup=as_markup)
            PlainConsole().print(markup, markup=as_markup)
            assert capsys.readouterr().out == rich_out.getvalue(), markup


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _state_files(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under .syncengine with its size, mtime and bytes (the locks, the quiet-round marker and the
    scanner's copy of the stamps aside: a cache, never fsynced, rewritten when the journal's stamps moved)."""
    state = root / ".syncengine"
    return {str(p.relative_to(state)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(state.rglob("*")) if p.is_file()
            and p.name not in ("sync.lock", "scan.lock", "journal.db-quiet-sync", "journal.db-stamps")}


@pytest.mark.integration
def test_a_no_op_sync_writes_nothing_durable_and_still_records_its_time(tmp_path: Path, kit):
    """A real `sync` process that finds nothing to do leaves the journal, its checkpoint and the blob store
    byte for byte as they were (no transaction, so no fsync); `status` still shows the newer sync time. A
    round that changes something records its time in the journal itself, as before."""
    replica = kit.replica({"a.json": '{"x": 1}\n', "notes/b.md": "# b\n"})
    hour_ago = time.time_ns() - 3600 * 10**9
    for path in replica.tree():  # files written long before: no racy stamps to hash again next round
        os.utime(replica.root / path, ns=(hour_ago, hour_ago))
    assert replica.proc("sync").code == 0
    assert replica.proc("sync").code == 0  # settles whatever the first round left (restamps, echoes)
    stored = replica.rows("SELECT last_seq, last_sync_at FROM sync_state")
    before = _state_files(replica.root)
    assert not any(name.endswith("-wal") for name in before)

    code, modules, out = run_probe(tmp_path, "-C", replica.root, "sync", TTY_COMPATIBLE="")
    assert code == 0 and "nothing to do" in out
    assert not _tops(modules) & {*NEVER_FOR_A_CLIENT, "pathspec"}  # a person's one line on a pipe: no rich
    # Nothing to apply nor push: the apply, push and history stacks stay unloaded.
    assert not modules & set(NOT_FOR_A_NO_OP), sorted(modules & set(NOT_FOR_A_NO_OP))
    made = dataclasses_made(modules)
    assert len(made) <= NO_OP_SYNC_DATACLASSES and not made & NOT_CREATED, sorted(made)
    assert _state_files(replica.root) == before
    assert replica.rows("SELECT last_seq, last_sync_at FROM sync_state") == stored
    shown = replica.status().sync.last_sync_at
    assert shown is not None and shown >= _iso(stored[0][1])

    replica.write("a.json", '{"x": 2}\n')
    assert replica.proc("sync").code == 0
    (last_seq, last_sync_at), = replica.rows("SELECT last_seq, last_sync_at FROM sync_state")
    assert last_seq > stored[0][0] and last_sync_at > stored[0][1]


def _iso(ns: int) -> str:
    from syncengine.history import iso

    return iso(ns)
