"""config.toml as written by Config.to_toml: what tomllib reads back is what was saved, in tomlkit's layout."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from syncengine.config import Config
from syncengine.errors import UsageError

AWKWARD = ['', 'plain', 'a"b', 'back\\slash', 'line\nbreak\r\n', 'tab\there', '\b\f', '\x00\x01\x1f\x7f',
           'é ü 漢字 😀', '# not a comment', '"""', "'single'", '\\u0041 stays text', ' = [x] ']


@pytest.mark.parametrize("text", AWKWARD)
def test_every_string_reads_back_as_it_was_saved(tmp_path: Path, text: str):
    config = Config()
    config.server.workspace = text
    config.history.keep = text
    config.save(tmp_path / "config.toml")
    loaded = Config.load(tmp_path / "config.toml")
    assert loaded.server.workspace == text and loaded.history.keep == text
    assert loaded == config


def test_numbers_and_booleans_read_back_with_their_types(tmp_path: Path):
    config = Config()
    config.server.allow_http = True
    config.server.timeout = 1e16
    config.server.retries = 2**62
    config.sync.max_delete = -0.5
    config.daemon.heartbeat = math.inf
    config.daemon.max_backoff = 0.1
    config.save(tmp_path / "config.toml")
    assert Config.load(tmp_path / "config.toml") == config
    config.daemon.poll_interval = math.nan
    assert math.isnan(tomllib.loads(config.to_toml())["daemon"]["poll_interval"])


def test_the_file_keeps_its_layout_a_comment_per_key():
    config = Config()
    config.server.url = "http://127.0.0.1:8765"
    text = config.to_toml()
    assert text.startswith('# syncengine replica settings; see docs/configuration.md\n\n[server]\n'
                           'url = "http://127.0.0.1:8765" # sync server base URL, e.g. http://127.0.0.1:8765\n'
                           'workspace = "" # workspace name on the server\n')
    assert '\n\n[sync]\nstrategy = "merge" # default conflict strategy' in text
    assert text.endswith('keep_last = 20 # ... and always at least this many snapshots\n')
    assert Config.from_dict(tomllib.loads(text)) == config


def test_a_value_toml_cannot_hold_is_refused_not_written():
    config = Config()
    config.server.url = None  # type: ignore[assignment]
    with pytest.raises(TypeError):
        config.to_toml()
    with pytest.raises(UsageError):
        Config.from_dict({"server": {"url": 5}})
