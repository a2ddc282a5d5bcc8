"""Every command's --help shows each option's default (issue 16: "--help of every command
shows defaults"). Pure: builds the parsers and formats their help, starts nothing."""

from __future__ import annotations

import argparse

import pytest

import genset.chat
import genset.launch
import genset.replay.__main__ as replay_main
import services.planner.__main__ as planner_main
from services.decode.__main__ import build_parser as worker_parser

PARSERS = {
    "up": genset.launch.build_parser,
    "replay": replay_main.build_parser,
    "chat": genset.chat._parser,
    "planner": planner_main.build_parser,
    "worker": worker_parser,
}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_with_a_default_shows_it(name):
    parser = PARSERS[name]()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or isinstance(action, argparse._HelpAction)):
            continue
        text = formatter._format_action(action)  # the option's lines in --help
        assert "default" in text, f"genset {name} {action.option_strings[0]}: {text!r}"
