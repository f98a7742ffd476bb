"""The `kiln` command: each stage alone on your own files, the whole pipeline, and profiles.

COMMANDS is the table from name to command, in the order `kiln --help` lists them; each command
declares its arguments next to its code (stages.py, release.py, humaneval.py, tuning.py, run.py, serve.py,
canary.py). To add one,
write a `Command` with `help`, `add_arguments` and `run`, and add it to the table.

A user mistake (a missing file, a bad setting) prints one line, `kiln: error: ...`, and exits 2;
no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline import logs
from pipeline.cli.canary import Canary
from pipeline.cli.command import Command
from pipeline.cli.download import Download
from pipeline.cli.humaneval import Humaneval
from pipeline.cli.release import Bench, Compare, Gguf, History, Models, Promote, Pull, Rollback, Seeds
from pipeline.cli.run import Run
from pipeline.cli.serve import ReplicaHostCommand, Serve
from pipeline.cli.stages import Clean, Device, Pretrain, Profiles, Tokenizer
from pipeline.cli.tuning import Tune
from pipeline.errors import KilnError

COMMANDS: dict[str, Command] = {
    "clean": Clean(),
    "profiles": Profiles(),
    "tokenizer": Tokenizer(),
    "download": Download(),
    "pretrain": Pretrain(),
    "device": Device(),
    "gguf": Gguf(),
    "bench": Bench(),
    "humaneval": Humaneval(),
    "tune": Tune(),
    "models": Models(),
    "compare": Compare(),
    "seeds": Seeds(),
    "promote": Promote(),
    "rollback": Rollback(),
    "pull": Pull(),
    "history": History(),
    "serve": Serve(),
    "replica": ReplicaHostCommand(),
    "canary": Canary(),
    "run": Run(),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="kiln: raw text and code to an evaluated, versioned GGUF model. "
        "Each subcommand runs one stage alone; `kiln run` runs the whole pipeline through Dagster.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.register(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args.func.__self__, "online", False):  # only `kiln download` reaches the hub by default
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    logs.configure()
    logs.bind(stage=args.command)
    try:
        return args.func(args)
    except KilnError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
