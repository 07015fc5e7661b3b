"""The `syncengine` command: click group, and the one place errors become exit codes.

Exit codes (DESIGN §6, docs/cli.md): 0 done; 1 done but conflicts remain;
2 usage; 3 server unreachable or failing; 4 authentication refused; 5 not a
workspace or a damaged one; 6 a safety guard stopped the run; 7 busy;
8 a local file could not be read or written; 70 internal error (traceback in
crash.log, never on the terminal).
"""

from __future__ import annotations

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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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


def _register() -> None:
    # Each module adds its commands to `cli`; importing them is all it takes.
    from cli import history, workspace_cmds  # noqa: F401

    for optional in ("cli.sync_cmds", "cli.server_cmds", "cli.conflict_cmds", "cli.daemon_cmds"):
        try:
            __import__(optional)
        except ModuleNotFoundError as exc:
            if exc.name != optional:
                raise


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
    _register()
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


def run() -> None:
    sys.exit(main())

