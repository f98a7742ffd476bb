"""`kiln tune`: the sampling_preset stage alone: an Optuna study over a GGUF's sampler values."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from pipeline.cli.command import Command, add_profile


class Tune(Command):
    help = "tune llama.cpp sampler values on held-out problems with Optuna; write presets.json"
    description = (
        "Run (or resume) an Optuna study (TPE sampler, median pruner, seeded) over temperature, top_p, top_k, "
        "min_p, repeat_penalty and max_tokens on a GGUF, maximising the profile's tune.objective (HumanEval "
        "pass@1 on held-out problems in the sandbox, or kiln_next_line) while tokens/s stays above "
        "tune.min_tokens_per_s. Writes presets.json (the best trial as `code`, with greedy and balanced) and "
        "study.json into OUTPUT. The study is stored in --storage (default: sqlite in OUTPUT): run the same "
        "command again to resume it after an interruption, or in several terminals to share the trials; "
        "watch it with `optuna-dashboard STORAGE`."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_profile(parser)
        parser.add_argument("--gguf", metavar="FILE", help="the GGUF to tune (default: the profile's Q4_K_M file)")
        parser.add_argument(
            "--output",
            "-o",
            metavar="DIR",
            help="where presets.json and study.json go (default: the profile's sampling_preset folder)",
        )
        parser.add_argument("--storage", metavar="URL", help="Optuna storage, e.g. postgresql+psycopg2://user@host/db "
                            "(default: tune.storage, else sqlite:///OUTPUT/study.db)")  # fmt: skip
        parser.add_argument("--trials", type=int, help="trials the study holds when done (default: tune.trials)")
        parser.add_argument("--timeout", type=float, help="seconds of tuning at most (default: tune.timeout)")
        parser.add_argument(
            "--validation", metavar="DIR", help="clean split folder for kiln_next_line (default: the profile's)"
        )

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.config import load_profile
        from pipeline.data.clean import read_split
        from pipeline.errors import KilnError
        from pipeline.io import writable_folder
        from pipeline.layout import Layout
        from pipeline.release.tuning import TUNED, TUNED_QUANT, heldout_items, markdown_table, tune, write_outputs

        profile = load_profile(args.profile)
        layout = Layout.for_profile(profile.name)
        out = writable_folder(Path(args.output)) if args.output else layout.tuning_dir
        s = profile.tune
        s = replace(s, trials=args.trials or s.trials, timeout=args.timeout or s.timeout)
        validation = []
        if s.objective.startswith("kiln_next_line"):
            folder = Path(args.validation) if args.validation else layout.clean_splits
            if not folder.is_dir():
                raise KilnError(f"{folder}: no clean split folder for kiln_next_line (give --validation DIR)")
            validation = list(read_split(folder, "validation"))
        held = (s.objective, s.problems, validation, profile.eval.timeout, profile.eval.unsafe_sandbox)
        items, fresh = heldout_items(*held), heldout_items(*held, fresh=True)
        storage = args.storage or s.storage or f"sqlite:///{out.resolve() / 'study.db'}"
        summary = tune(Path(args.gguf or layout.gguf(TUNED_QUANT)), items, s, storage, fresh=fresh)
        write_outputs(summary, out / "presets.json", out / "study.json")
        best = summary["best"]
        print(markdown_table(summary))
        chosen = "greedy (no trial qualified)" if best["number"] is None else f"trial {best['number']}"
        print(f"\nbest: {chosen}, {s.objective} {best['value']:.3f}, {best['tokens_per_s']:.0f} tokens/s")
        if summary.get("untuned"):
            print(f"untuned: {summary['untuned']}")
        print(f"preset {TUNED!r}: {summary['presets'][TUNED]}")
        print(f"written: {out / 'presets.json'}, {out / 'study.json'}")
        print(f"inspect: {summary['dashboard']}")
        return 0
