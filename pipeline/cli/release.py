"""`kiln gguf`, `kiln bench`: GGUF files from a checkpoint, and their speed. `kiln models`, `promote`,
`rollback`, `pull`, `history`: one profile's versions in the MLflow registry."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pipeline.cli.command import Command, add_profile
from pipeline.io import writable_folder


class Gguf(Command):
    help = "convert a HF Llama checkpoint to GGUF F16, Q8_0 and Q4_K_M"
    description = (
        "Write NAME-F16.gguf (kiln's converter) and NAME-Q8_0.gguf, NAME-Q4_K_M.gguf "
        "(llama.cpp's quantizer) into OUTPUT. The checkpoint folder needs its tokenizer."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--model", required=True, metavar="DIR", help="a save_pretrained folder (config, safetensors, tokenizer)"
        )
        parser.add_argument("--output", "-o", required=True, metavar="DIR")
        parser.add_argument("--name", default="kiln", help="file name prefix and the GGUF's general.name")

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.release.gguf_export import export_all

        files = export_all(Path(args.model), writable_folder(Path(args.output)), args.name)
        for kind, path in files.items():
            print(f"{kind:>7}  {path.stat().st_size / 2**20:8.1f} MB  {path}")
        return 0


class Bench(Command):
    help = "measure GGUF files with llama.cpp: pp512, tg128, TTFT, latency, memory, bandwidth share, cost"
    description = "Runs kiln's llama-bench-style measurement on any GGUF files and prints a Markdown table."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("files", nargs="+", metavar="GGUF")
        parser.add_argument(
            "--price-per-hour", type=float, default=0.10, help="machine price for the cost per million tokens"
        )
        parser.add_argument("--quick", action="store_true", help="one repeat, 20 latency requests, one context size")
        parser.add_argument("--json", metavar="FILE", help="also write the full results as JSON")

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.release.gguf_bench import (
            THREADS,
            benchmark_file,
            check_gguf,
            last_level_cache_bytes,
            markdown_table,
            memory_bandwidth,
        )

        for path in args.files:  # every file is checked before any is measured
            check_gguf(Path(path))
        bandwidth, cache = memory_bandwidth(THREADS), last_level_cache_bytes()
        prompt = list(range(100, 612))  # token ids below every real vocabulary's size: speed only, not sense
        results = {
            Path(p).name: benchmark_file(
                Path(p), prompt, bandwidth, args.price_per_hour, quick=args.quick, cache_bytes=cache
            )
            for p in args.files
        }
        print(markdown_table(results))
        print(f"\nmachine bandwidth {bandwidth / 1e9:.1f} GB/s on {THREADS} threads", file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0


class RegistryCommand(Command):
    """A command on kiln-<profile>, the registered model of one profile: every one takes --profile and
    --tracking-uri, before its own arguments."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_profile(parser, help="whose registered model: kiln-<profile> (default: $KILN_PROFILE or tiny)")
        parser.add_argument(
            "--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI or registry/)"
        )

    @staticmethod
    def target(args: argparse.Namespace) -> tuple[str, str]:
        """The tracking URI and the profile name whose versions the command reads or moves."""
        from pipeline.config import load_profile
        from pipeline.tracking import default_tracking_uri

        return args.tracking_uri or default_tracking_uri(), load_profile(args.profile).name


class Models(RegistryCommand):
    help = "list the registered versions: created, aliases, key metrics, file sizes"
    description = (
        "List the registered versions as a table of key columns: version, created, aliases, parameters, the base "
        "model's held-out bits per byte, each GGUF's tg128 tokens/s (generation speed, named tg128 as llama-bench "
        "names it; a model trained on a shorter context generates fewer tokens, shown in brackets) and the GGUF "
        "sizes in MB. --wide: every tag as a column; --json: every tag, as JSON."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--json", action="store_true", help="every tag of every version, as JSON")
        parser.add_argument("--wide", action="store_true", help="every tag as a column")

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.release.registry import list_versions

        rows = list_versions(*self.target(args))
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        first = ["version", "created", "aliases"]
        if args.wide:
            keys = first + sorted({k for r in rows for k in r} - set(first))
            print(aligned([keys, *[[str(r.get(k, "")) for k in keys] for r in rows]]))
            return 0
        table = [key_columns(r) for r in rows]
        heads = list(dict.fromkeys(h for t in table for h in t))
        print(aligned([heads, *[[t.get(h, "-") for h in heads] for t in table]]))
        return 0


_TG = re.compile(r"^(?P<quant>.+)_tg(?P<n>\d+)_tokens_per_s$")


def key_columns(row: dict) -> dict[str, str]:
    """The few columns `kiln models` shows by default, as text: speeds named tg128 whatever the
    length measured (the measured length in brackets when shorter), sizes in MB."""
    out = {k: str(row.get(k, "")) or "-" for k in ("version", "created", "aliases")}
    out["params"] = f"{float(row['parameters']) / 1e6:.1f}M" if row.get("parameters") else "-"
    out["base bpb"] = f"{float(row['base_val_bpb']):.3f}" if row.get("base_val_bpb") else "-"
    for key, value in sorted(row.items()):
        m = _TG.match(key)
        if m:
            short = "" if m["n"] == "128" else f" ({m['n']} tok)"
            out[f"{m['quant']} tg128 tok/s"] = f"{float(value):,.0f}{short}"
        elif key.endswith(".gguf"):
            out[f"{key.rsplit('-', 1)[-1].removesuffix('.gguf')} MB"] = f"{int(value) / 2**20:.1f}"
    return out


def aligned(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


class Promote(RegistryCommand):
    help = "verify a version's files against their sha256 tags and make it production"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("version", nargs="?", default=None, help="version number or alias (default: the candidate)")

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.release.registry import promote

        uri, profile = self.target(args)
        e = promote(uri, profile, args.version)
        print(f"kiln-{profile}: production -> version {e['to']} (was {e['from'] or 'none'}); files verified")
        return 0


class Rollback(RegistryCommand):
    help = "point production back to the version that held it before the last promotion"

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.release.registry import rollback

        uri, profile = self.target(args)
        e = rollback(uri, profile)
        print(f"kiln-{profile}: production rolled back from version {e['from']} to {e['to']}")
        return 0


class Pull(RegistryCommand):
    help = "download a version's files, verified against their hashes"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("which", metavar="ALIAS_OR_VERSION")
        parser.add_argument("--output", "-o", required=True, metavar="DIR")

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.release.registry import pull

        uri, profile = self.target(args)
        out = pull(uri, profile, args.which, Path(args.output))
        print(f"kiln-{profile} {args.which}: files verified and written to {out}")
        return 0


class History(RegistryCommand):
    help = "the promotion history: who moved production, when, from which version; canary decisions with why"

    def run(self, args: argparse.Namespace) -> int:
        import time

        from pipeline.release.registry import history

        for e in history(*self.target(args)):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["when"]))
            why = f"  ({e['reason']})" if e.get("reason") else ""
            print(f"{when}  {e['action']:<8} {e['from'] or '-':>4} -> {e['to']:<4} by {e['who']}{why}")
        return 0


class Compare(RegistryCommand):
    help = "versions side by side: eval figures, GGUF speed and memory, sizes, presets, gate; what moved"
    description = (
        "Compare registered versions (numbers or aliases; the first is the reference): eval figures with their "
        "standard errors and n, GGUF tokens/s, time to first token and peak memory, file sizes, presets and the "
        "gate's verdict. Each eval figure is tested on the paired per-item differences (the same documents and "
        "problems) and shown with its 95%% interval; * marks a figure whose interval excludes 0 after Holm's "
        "correction over all the figures tested. Stored speeds come from different runs and are never starred; "
        "when the GGUF files are at hand their speed is measured again here, in turns, and that is tested. "
        "Where `kiln seeds` recorded how far re-trains of one recipe spread, each eval interval also holds that "
        "spread, so a star says the recipes differ beyond what re-training alone moves. "
        "Ends with MLflow's comparison link of the versions' runs."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("versions", nargs="+", metavar="VERSION", help="version numbers or aliases, two or more")
        parser.add_argument("--json", action="store_true", help="print the comparison as JSON (intervals, p-values)")
        parser.add_argument(
            "--speed-repeats", type=int, default=5, metavar="N",
            help="repeats of the interleaved speed measurement of the versions' GGUFs, at least 5 (0: skip it)",
        )  # fmt: skip
        parser.add_argument(
            "--seeds", metavar="V,V,V",
            help="re-trains of one recipe whose spread widens the eval intervals, for this comparison only "
                 "(default: the spread `kiln seeds` recorded; none: no spread)",
        )  # fmt: skip

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.errors import KilnError
        from pipeline.release.compare import compare, table
        from pipeline.release.paired import MIN_REPEATS

        if args.speed_repeats and args.speed_repeats < MIN_REPEATS:
            raise KilnError(f"--speed-repeats must be 0 or at least {MIN_REPEATS}, not {args.speed_repeats}")
        seeds = None if args.seeds is None else [] if args.seeds == "none" else args.seeds.split(",")
        result = compare(*self.target(args), args.versions, args.speed_repeats, seeds)
        print(json.dumps(result, indent=2) if args.json else table(result))
        return 0


class Seeds(RegistryCommand):
    help = "record how far re-trains of one recipe with different seeds spread, for kiln compare's intervals"
    description = (
        "Given three or more versions trained alike except for their seeds (their runs' settings may differ only "
        "in *.seed), record each eval figure's standard deviation across them on the registered model. kiln "
        "compare then widens each eval interval by one seed draw per side, so that a star means the recipes "
        "differ beyond what re-training alone moves. Without versions: show the recorded spread."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("versions", nargs="*", metavar="VERSION", help="version numbers or aliases, three or more")

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.release import seed_spread

        uri, profile = self.target(args)
        spread = seed_spread.record(uri, profile, args.versions) if args.versions else seed_spread.stored(uri, profile)
        if spread is None:
            print(f"kiln-{profile}: no seed spread recorded (kiln seeds V V V ... records one)")
            return 0
        print(f"kiln-{profile}: seed spread of versions {', '.join(spread['versions'])}")
        print(aligned([["figure", "sd"], *[[n, f"{sd:.4g}"] for n, sd in spread["sd"].items()]]))
        return 0
