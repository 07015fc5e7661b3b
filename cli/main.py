"""The `syncengine` command: click group, and the one place errors become exit codes.

Exit codes (DESIGN §6, docs/cli.md): 0 done; 1 done but conflicts remain;
2 usage; 3 server unreachable or failing; 4 authentication refused; 5 not a
workspace or a damaged one; 6 a safety guard stopped the run; 7 busy;
8 a local file could not be read or written; 70 internal error (traceback in
crash.log, never on the terminal).
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

import click

from syncengine.errors import SyncEngineError

EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class Context:
    """What every command gets: where it runs, and how to render."""

    def __init__(self, start: Path) -> None:
        self.start = start


# Every command: the module that defines it, and its short help. A call
# imports the one module it runs (a `status` never loads the server's or the
# daemon's stack), and `--help` lists them all from this table without
# importing any. tests/test_cli.py checks the table against the commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "conflicts": ("cli.conflict_cmds", "List open conflicts with the fields or lines involved."),
    "daemon": ("cli.daemon_cmds", "The background daemon: watch the folder, autosave, sync, live updates."),
    "diff": ("cli.history", "Show what changed since the last sync (or since a snapshot)."),
    "events": ("cli.daemon_cmds", "Show what the daemon and syncs publish: zones, processing, progress, log."),
    "gc": ("cli.history", "Prune old snapshots (folded, never breaking the rest) and unreferenced blobs."),
    "init": ("cli.workspace_cmds", "Make PATH (default: here) a workspace and record the files in it."),
    "log": ("cli.history", "Show the change journal, newest first (for PATH: that document's history)."),
    "repair": ("cli.workspace_cmds",
               "Set a damaged journal (or blob store) aside and rebuild it from the files (with no base)."),
    "resolve": ("cli.conflict_cmds", "Settle the open conflict at PATH; the next `sync` pushes your choice."),
    "restore": ("cli.history", "Bring back SNAPSHOT (an id, or 'latest'), whole or only PATHS."),
    "serve": ("cli.server_cmds", "Run the sync server in the foreground (Ctrl-C stops it)."),
    "server": ("cli.server_cmds", "Server upkeep (run on the server's machine): gc of old history and blobs."),
    "snapshot": ("cli.history", "Record the current state of every file, so it can be restored later."),
    "snapshots": ("cli.history", "List snapshots, newest first."),
    "status": ("cli.workspace_cmds", "Scan, then show pending changes, conflicts, the last snapshot and sync."),
    "sync": ("cli.sync_cmds", "Exchange changes with the server: pull, merge, push."),
    "token": ("cli.server_cmds", "Create, list and revoke the server's access tokens (run on the server's machine)."),
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command runs (click's LazyGroup pattern).

    Importing every command module cost about 0.15 s per call (the history,
    merge and server stacks, rich), paid by every `syncengine` process.
    """

    def __init__(self, *args, lazy: dict[str, tuple[str, str]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            if cmd_name in WALK_AHEAD and _START_UP["collector_paused"]:
                _walk_ahead(ctx)
            module = importlib.import_module(self.lazy[cmd_name][0])
            self.add_command(getattr(module, cmd_name), cmd_name)
            _end_start_up()
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click's own layout; a command not loaded stands in as a bare Command holding the table's short help.
        shown = [(name, self.commands.get(name) or click.Command(name, help=self.lazy[name][1]))
                 for name in self.list_commands(ctx)]
        shown = [(name, cmd) for name, cmd in shown if not cmd.hidden]
        if shown:
            limit = formatter.width - 6 - max(len(name) for name, _cmd in shown)
            with formatter.section("Commands"):
                formatter.write_dl([(name, cmd.get_short_help_str(limit)) for name, cmd in shown])


@click.group(cls=LazyGroup, lazy=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "-C",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run as if started in this folder (like git -C).",
)
@click.version_option(package_name="syncengine")
@click.pass_context
def cli(ctx: click.Context, directory: Path | None) -> None:
    """Offline-first sync for folders of documents.

    Every command works from any folder inside a workspace. With --json a
    command prints one JSON document on stdout. Exit codes: 0 done, 1 conflicts
    remain, 2 usage, 3 server unreachable, 4 auth refused, 5 not a workspace or
    damaged, 6 stopped by a safety guard, 7 busy, 8 file system error, 70 internal.
    """
    start = (directory or Path.cwd()).absolute()
    if directory is not None and not start.is_dir():
        raise click.BadParameter(f"{directory} is not a folder", param_hint="-C")
    ctx.obj = Context(start)


# Commands whose first step is a scan: a fresh process starts its walk ahead of their imports (_walk_ahead).
WALK_AHEAD = ("status", "sync")


def _walk_ahead(ctx: click.Context) -> None:
    """Start the scan's walk in a forked child (syncengine.early) before the command's stack is imported.

    Only in a fresh `syncengine` process (`run`, which paused the collector):
    nothing in it has a thread, an SQLite connection or a lock yet. Not
    for --help, which scans nothing.
    """
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        return
    from syncengine import early

    directory = ctx.params.get("directory")
    early.start(os.fspath(directory) if directory is not None else os.getcwd())


def _register() -> None:
    """Load every command into ``cli.commands`` (for tests and tools that walk them; a call loads only its own)."""
    for name in COMMANDS:
        cli.get_command(click.Context(cli), name)


def _crash_log_path(start: Path) -> Path:
    for folder in (start, *start.parents):
        candidate = folder / ".syncengine"
        if candidate.is_dir():
            return candidate / "crash.log"
    state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "syncengine"
    state.mkdir(parents=True, exist_ok=True)
    return state / "crash.log"


def _write_crash(start: Path, exc: BaseException) -> Path:
    path = _crash_log_path(start)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} syncengine {' '.join(sys.argv[1:])}\n")
        fh.write("".join(traceback.format_exception(exc)))
    return path


def _start_dir(args: list[str]) -> Path:
    for i, arg in enumerate(args):
        if arg == "-C" and i + 1 < len(args):
            return Path(args[i + 1]).absolute()
    return Path.cwd()


def main(args: list[str] | None = None) -> int:
    """Entry point: run the CLI and map every outcome to the documented exit code."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        result = cli.main(args=argv, prog_name="syncengine", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        # One line: the usage error itself, with a pointer to --help.
        click.echo(f"Usage error: {exc.format_message()} (see `syncengine --help`)", err=True)
        return EXIT_USAGE
    except click.Abort:
        click.echo("Aborted.", err=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        return EXIT_INTERRUPTED
    except SyncEngineError as exc:
        if exc.exit_code == EXIT_INTERNAL:
            where = _write_crash(_start_dir(argv), exc)
            click.echo(f"{exc.one_line()} (details in {where})", err=True)
        else:
            click.echo(exc.one_line(), err=True)
        return exc.exit_code
    except BrokenPipeError:
        return 0
    except Exception as exc:  # the last line of defence: no traceback on a terminal
        where = _write_crash(_start_dir(argv), exc)
        click.echo(f"Internal error: {type(exc).__name__}: {exc} (traceback in {where})", err=True)
        return EXIT_INTERNAL
    return result if isinstance(result, int) else 0


_START_UP = {"collector_paused": False}


def _pause_collector() -> None:
    """No automatic collection while a CLI process imports its stacks (`run` until its command's module is in).

    Imports only allocate what lives until exit (modules, classes,
    functions), yet a no-op sync's ~100,000 such objects paid ~75 young
    collections, ~11 ms of its ~155 ms of imports, for nothing to free.
    """
    if gc.isenabled():
        gc.disable()
        _START_UP["collector_paused"] = True


def _end_start_up() -> None:
    """Freeze what start-up made (never scanned again, by a round's collections either) and collect as usual.

    Only a process `run` paused: a test or tool importing a command keeps its own collector as it was.
    """
    if _START_UP["collector_paused"]:
        _START_UP["collector_paused"] = False
        gc.freeze()
        gc.enable()


def run() -> None:
    _pause_collector()
    code = main()
    # The process ends now. Interpreter teardown walks every object left (the
    # imported stacks: ~30 ms after a no-op sync, more than its HTTP request);
    # frozen, they are left to the OS. atexit handlers and the flush of
    # stdout/stderr still run: only the final garbage collection skips them.
    gc.freeze()
    sys.exit(code)

