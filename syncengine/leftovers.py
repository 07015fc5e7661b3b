"""What a killed apply leaves behind, and how the next round clears it.

An apply writes temp files beside their targets and sets replaced files
aside in ``.syncengine/trash``. A marker file says an apply is under way:
only a round that finds it (one killed mid-apply) pays for the walk that
removes stray temp files; the trash is checked every time, cheaply.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from syncengine.fsops import clean_temp_files, recover_trash
from syncengine.paths import STATE_DIR


def _marker(root: Path) -> Path:
    return root / STATE_DIR / "applying"


def begin_apply(root: Path) -> None:
    """Note that files are about to be written, so a kill leaves a trace to clean up after."""
    marker = _marker(root)
    if not marker.exists():
        marker.write_bytes(b"")


def end_apply(root: Path) -> None:
    """The apply finished: its temp files are gone and its journal rows committed."""
    with contextlib.suppress(FileNotFoundError):
        _marker(root).unlink()


def recover(root: Path) -> None:
    """Finish what a killed apply left: put set-aside files back, remove its temp files.

    Runs at the start of every round, under the sync lock, so no apply of
    another process is in flight.
    """
    recover_trash(root)
    if _marker(root).exists():
        clean_temp_files(root)
        end_apply(root)
