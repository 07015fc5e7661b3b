"""`python -m cli`: the same as the `syncengine` script."""

from cli.main import run

run()
