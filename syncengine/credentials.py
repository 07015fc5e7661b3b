"""The server token of a replica: stored beside the journal, readable by its owner only.

``SYNCENGINE_TOKEN`` overrides the stored token. A token file that others can
read, or that is a symlink, is refused like ssh refuses a loose private key
(RELIABILITY F5). Tokens never travel through argv, where `ps` shows them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from syncengine.errors import AuthError, UsageError
from syncengine.fsops import write_config_file


def save_token(path: Path, token: str) -> None:
    token = token.strip()
    if not token or any(c.isspace() for c in token):
        raise UsageError("the token is empty or contains white space")
    write_config_file(path, token.encode() + b"\n", mode=0o600)


def load_token(path: Path) -> str | None:
    """The token to use: SYNCENGINE_TOKEN, else the stored one, else None."""
    env = os.environ.get("SYNCENGINE_TOKEN", "").strip()
    if env:
        return env
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise AuthError(f"{path} is not a regular file; refusing to read a token through it")
    if st.st_mode & 0o077:
        raise AuthError(
            f"{path} can be read by other users",
            hint=f"run `chmod 600 {path}` (the token grants access to the workspace)",
        )
    return path.read_text(encoding="utf-8").strip() or None
