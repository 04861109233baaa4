"""Every command and group of the CLI shows an example in its --help (click's CliRunner, in-process)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from monitor.cli import cli


def command_paths(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The argv path of ``command`` and of every command and group under it."""
    paths = [path]
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            paths.extend(command_paths(sub, (*path, name)))
    return paths


PATHS = command_paths(cli)


def test_the_walk_finds_every_command() -> None:
    assert {(), ("run",), ("status",), ("close",), ("accounts",), ("accounts", "add"), ("positions", "history"),
            ("db", "migrate"), ("lock", "clear")} <= set(PATHS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "position-monitor")
def test_help_shows_an_example_of_the_command(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="position-monitor")
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    assert "Examples:" in lines or "Example:" in lines, result.output
    command = " ".join(("position-monitor", *path))
    examples = [line for line in lines if line == command or line.startswith(command + " ")]
    assert examples, f"no example line starting with {command!r} in:\n{result.output}"
    # \b kept the example lines unwrapped: each is a whole command line, not a fragment of a paragraph
    assert all(not line.endswith(("--", "-")) for line in examples), examples
