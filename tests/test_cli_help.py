"""The command line explains itself: every option has help that shows its default, and every
subcommand's help has an example and its exit statuses."""

from __future__ import annotations

import argparse
import re

import pytest

from coordinator.launch.cli import build_parser
from protocol.exit_codes import AgentExit, RunExit

PARSER = build_parser()
SUBCOMMANDS: dict[str, argparse.ArgumentParser] = next(
    a.choices for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)
)


def exit_statuses(help_text: str) -> dict[int, str]:
    """The `exit statuses:` block of a help text: status -> what it means."""
    block = help_text.split("exit statuses:\n", 1)[1].split("\n\n", 1)[0]
    return {int(m[1]): m[2] for m in re.finditer(r"^\s+(\d+)\s+(.+)$", block, re.M)}


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_help_has_an_example_and_exit_statuses(name: str) -> None:
    text = SUBCOMMANDS[name].format_help()
    assert re.search(r"^examples?:\n  fragsim ", text, re.M), text
    statuses = exit_statuses(text)
    assert 0 in statuses, text


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_option_has_help_that_shows_its_default(name: str) -> None:
    parser = SUBCOMMANDS[name]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"fragsim {name} {action.dest}: no help text"
        if action.option_strings and not action.required:
            shown = formatter._expand_help(action) if hasattr(formatter, "_expand_help") else action.help
            assert "default" in shown, f"fragsim {name} {'/'.join(action.option_strings)}: {shown!r} shows no default"


def test_a_numeric_default_is_shown_with_its_value() -> None:
    text = " ".join(SUBCOMMANDS["soak"].format_help().split())
    assert "how many runs (default 50)" in text


def test_a_flag_says_it_is_off_by_default() -> None:
    text = " ".join(SUBCOMMANDS["prepare"].format_help().split())
    assert "rebuild even if already prepared (default off)" in text


@pytest.mark.parametrize("name", ["simulate", "resume", "serve"])
def test_the_run_commands_list_every_run_exit_status(name: str) -> None:
    assert set(exit_statuses(SUBCOMMANDS[name].format_help())) == {int(code) for code in RunExit}


def test_the_agent_lists_every_agent_exit_status() -> None:
    assert set(exit_statuses(SUBCOMMANDS["agent"].format_help())) == {int(code) for code in AgentExit}
