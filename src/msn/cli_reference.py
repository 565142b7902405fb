"""The CLI reference page, generated from the argparse parser that ``msn --help`` prints.

``cli_markdown()`` walks ``msn.cli.build_parser()``: for ``msn`` and every subcommand (nested
ones included) it writes the usage line, the description and a table of every option with its
help. The documentation build calls it (``docs/hooks/cli_reference.py``), so the page cannot
drift from ``--help``; ``tests/test_docs.py`` checks that every flag ``msn CMD --help`` prints is on it.
"""

from __future__ import annotations

import argparse


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def commands(parser: argparse.ArgumentParser | None = None, prefix: str = "msn"):
    """(command line, parser) for ``msn`` and every subcommand, depth first."""
    from msn.cli import build_parser

    parser = parser or build_parser()
    yield prefix, parser
    for name, sub in _subparsers(parser).items():
        yield from commands(sub, f"{prefix} {name}")


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _row(action: argparse.Action) -> str | None:
    if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
        return None
    names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
    if action.option_strings and action.nargs != 0:
        names += f" `{action.metavar or action.dest.upper()}`"
    if action.choices and not isinstance(action.choices, dict):
        names += " (" + ", ".join(map(str, action.choices)) + ")"
    help_text = action.help or ""
    if "%(" in help_text:
        help_text = help_text % {**vars(action), "prog": ""}
    return f"| {names} | {_cell(help_text)} |"


def cli_markdown() -> str:
    out = ["# CLI reference", "",
           "Generated from the parser behind `msn --help` when the documentation is built; each "
           "command's `--help` prints the same.", ""]
    for line, parser in commands():
        out += [f"## `{line}`", ""]
        if parser.description:
            out += [_cell(parser.description), ""]
        out += ["```text", parser.format_usage().strip(), "```", ""]
        subs = _subparsers(parser)
        if subs:
            out += ["| command | what it does |", "|---|---|"]
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for choice in action._choices_actions:
                        out.append(f"| `{line} {choice.dest}` | {_cell(choice.help)} |")
            out.append("")
        rows = [r for r in map(_row, parser._actions) if r]
        if rows:
            out += ["| option | meaning |", "|---|---|", *rows, ""]
    return "\n".join(out)
