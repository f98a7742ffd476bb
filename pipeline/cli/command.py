"""What a `kiln` subcommand is: its help, its arguments and its handler in one small object.

`pipeline.cli.COMMANDS` is the table from name to Command; options that several commands take are
declared once here and added by the commands that take them.
"""

from __future__ import annotations

import argparse

PROFILE_HELP = "profile name or YAML file (default: $KILN_PROFILE or tiny)"


def add_profile(parser: argparse.ArgumentParser, help: str = PROFILE_HELP) -> None:
    """The one `--profile`. None means $KILN_PROFILE, else tiny: `load_profile` decides, so every command
    falls back the same way."""
    parser.add_argument("--profile", default=None, help=help)


class Command:
    """One `kiln NAME`: `help` is its line in `kiln --help`, `description` heads `kiln NAME --help`
    (the help line when it has none), `add_arguments` declares its arguments and `run` does the work,
    returning the exit code."""

    help: str = ""
    description: str | None = None
    online: bool = False
    """Whether it may reach the Hugging Face hub; the others run with HF_HUB_OFFLINE=1 unless it is set."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """No arguments unless the command declares some."""

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError

    def register(self, subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=self.help, description=self.description or self.help)
        self.add_arguments(parser)
        parser.set_defaults(func=self.run)
        return parser


class Group(Command):
    """`kiln NAME ACTION ...`: a command whose actions are Commands of their own."""

    actions: dict[str, Command] = {}

    def register(self, subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=self.help, description=self.description or self.help)
        inner = parser.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")
        for action_name, action in self.actions.items():
            action.register(inner, action_name)
        return parser
