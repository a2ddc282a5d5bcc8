"""Every command's --help shows each option's default (issue 16: "--help of every command
shows defaults"). Pure: builds the parsers and formats their help, starts nothing."""

from __future__ import annotations

import argparse

import pytest

import genset.chat
import genset.launch
import genset.replay.__main__ as replay_main
import services.planner.__main__ as planner_main
from genset import cli
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


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_names_itself_genset_command_in_its_help(name, capsys):
    """`genset schema --help` said `usage: python -m proto.schema` (proto/ cannot import
    genset, so the name is passed in: `main(argv, prog=...)`)."""
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: genset {name} "), out[:200]


def test_schema_run_as_a_module_keeps_its_own_name(capsys):
    import proto.schema

    with pytest.raises(SystemExit):
        proto.schema.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m proto.schema ")
    with pytest.raises(SystemExit):  # an error names the command it was run as, too
        proto.schema.main(["a.json", "b.json"], prog="genset schema")
    assert "genset schema: error: unrecognized arguments: b.json" in capsys.readouterr().err
