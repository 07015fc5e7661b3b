"""Where a workspace lives on disk: finding its root like git does, and creating one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from syncengine.config import Config
from syncengine.errors import NotAWorkspace, WorkspaceExists
from syncengine.paths import STATE_DIR


@dataclass(frozen=True)
class Layout:
    """Every path the engine keeps inside ``ROOT/.syncengine``."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR

    @property
    def journal(self) -> Path:
        return self.state / "journal.db"

    @property
    def events(self) -> Path:
        return self.state / "events.db"

    @property
    def objects(self) -> Path:
        return self.state / "objects"

    @property
    def config(self) -> Path:
        return self.state / "config.toml"

    @property
    def token(self) -> Path:
        return self.state / "token"

    @property
    def sync_lock(self) -> Path:
        return self.state / "sync.lock"

    @property
    def crash_log(self) -> Path:
        return self.state / "crash.log"

    @property
    def daemon_pid(self) -> Path:
        return self.state / "daemon.pid"

    @property
    def daemon_log(self) -> Path:
        return self.state / "daemon.log"


def find_root(start: Path) -> Path:
    """The nearest folder at or above ``start`` holding ``.syncengine/``."""
    start = start.absolute()
    for folder in (start, *start.parents):
        if (folder / STATE_DIR / "config.toml").is_file() or (folder / STATE_DIR / "journal.db").is_file():
            return folder
    raise NotAWorkspace(
        f"{start} is not inside a syncengine workspace",
        hint="run `syncengine init` to create one",
    )


def create(root: Path, config: Config | None = None) -> Layout:
    """Create ``ROOT/.syncengine`` with its config; the journal is made on first open."""
    root = root.absolute()
    layout = Layout(root)
    if layout.config.exists():
        raise WorkspaceExists(f"{root} is already a workspace")
    for parent in root.parents:
        if (parent / STATE_DIR / "config.toml").is_file():
            raise WorkspaceExists(
                f"{root} is inside the workspace {parent}",
                hint="workspaces cannot nest",
            )
    root.mkdir(parents=True, exist_ok=True)
    layout.state.mkdir(exist_ok=True)
    layout.objects.mkdir(exist_ok=True)
    (config or Config()).save(layout.config)
    return layout


def root_identity(root: Path) -> tuple[int, int]:
    """(device, inode) of the root: when it changes, the folder was copied."""
    st = os.stat(root)
    return st.st_dev, st.st_ino
