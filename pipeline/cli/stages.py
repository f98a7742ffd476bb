"""`kiln clean`, `kiln tokenizer`, `kiln pretrain`: one stage alone on your own files; `kiln profiles`,
`kiln device`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.cli.command import Command, add_profile
from pipeline.errors import KilnError
from pipeline.io import writable_folder


class Clean(Command):
    help = "clean your own files: dedup, PII masking, quality filters, train/validation split"
    description = (
        "Read text, code, JSONL or Parquet files (or folders of them) and write "
        "OUTPUT/clean/{train,validation}-*.jsonl, OUTPUT/rejected/*.jsonl (each with its reason) "
        "and OUTPUT/stats.json. Thresholds come from the profile's `clean` section."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders to clean")
        parser.add_argument(
            "--output", "-o", required=True, metavar="DIR", help="folder for clean/, rejected/ and stats.json"
        )
        parser.add_argument(
            "--text-field", default="text", help="field holding the text in JSONL/Parquet rows (default: text)"
        )
        add_profile(parser)
        parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.config import load_profile
        from pipeline.data.clean import clean_corpus
        from pipeline.data.ingest import Source, build_raw_corpus

        profile = load_profile(args.profile)
        sources = [Source(path=p, text_field=args.text_field) for p in args.inputs]
        for p in args.inputs:
            if not Path(p).exists():
                raise KilnError(f"{p}: no such file or folder")
        output = writable_folder(Path(args.output))
        raw = output / "raw.jsonl"
        # Every document of every input: no byte budget and no code/prose mix for a user's own files.
        ingest = build_raw_corpus(sources, raw, max_bytes=None, code_share=None, progress=not args.quiet)
        stats = clean_corpus([raw], output, profile.clean, progress=not args.quiet)
        raw.unlink()
        summary = {"ingested": ingest.documents, **stats.to_dict()}
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        print(f"clean documents in {output / 'clean'}, rejected in {output / 'rejected'}", file=sys.stderr)
        return 0


class Profiles(Command):
    help = "list the profiles with their exact parameter counts (--json: every setting)"
    description = (
        "List the shipped profiles (the YAML files in profiles/), smallest model first, or one profile "
        "by name or file, with the exact parameter count of the model it builds."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", nargs="?", help="a profile name or YAML file")
        parser.add_argument("--json", action="store_true", help="print every setting of each profile as JSON")

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.config import PROFILE_NAMES, load_profile
        from pipeline.train.pretrain import count_parameters

        profiles = [load_profile(name) for name in ([args.name] if args.name else PROFILE_NAMES)]
        counted = sorted(((count_parameters(p.model, p.tokenizer.vocab_size), p) for p in profiles), key=lambda c: c[0])
        for n, profile in counted:
            if profile.model.from_pretrained:  # its size is the downloaded model's, not the shape's
                n = None
            if args.json:
                print(json.dumps({**profile.to_dict(), "parameters": n}, indent=2, default=str))
                continue
            if n is None:
                ref = profile.model.from_pretrained
                print(f"{profile.name:>6}: from_pretrained {ref} (its size: kiln download --info {ref})")
                continue
            m, t = profile.model, profile.pretrain
            print(
                f"{profile.name:>6}: {n:>12,} parameters  (hidden {m.hidden_size}, mlp {m.intermediate_size}, "
                f"{m.num_layers} layers, {m.num_heads}/{m.num_kv_heads} heads, "
                f"vocab {profile.tokenizer.vocab_size}); "
                f"{t.steps} steps of {t.micro_batch * t.grad_accum}x{t.seq_len} tokens; context {profile.context}"
            )
        return 0


def clean_folder(path: str) -> Path:
    """A `kiln clean` output folder or its clean/ folder: where train-*.jsonl and validation-*.jsonl are."""
    folder = Path(path)
    if (folder / "clean").is_dir():
        folder = folder / "clean"
    if not any(folder.glob("train-*.jsonl")):
        raise KilnError(f"{path}: no train-*.jsonl here (give a `kiln clean` output folder)")
    return folder


class Tokenizer(Command):
    help = "train the 32k byte-level BPE on a cleaned corpus"
    description = (
        "Train the tokenizer on CLEAN/train-*.jsonl and measure it on CLEAN/validation-*.jsonl; "
        "writes OUTPUT/tokenizer/ (a transformers tokenizer folder) and OUTPUT/stats.json."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--clean", required=True, metavar="DIR", help="a `kiln clean` output folder")
        parser.add_argument("--output", "-o", required=True, metavar="DIR")
        add_profile(parser)

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.config import load_profile
        from pipeline.train.tokenizer import build_tokenizer

        clean, profile = clean_folder(args.clean), load_profile(args.profile)
        stats = build_tokenizer(clean, writable_folder(Path(args.output)), profile)
        print(json.dumps(stats, indent=2, ensure_ascii=False))
        return 0


class Pretrain(Command):
    help = "pretrain the base model from scratch (resumes an interrupted run)"
    description = (
        "Tokenize the cleaned corpus, then pretrain the profile's Llama model; writes "
        "OUTPUT/model/ (save_pretrained with safetensors and the tokenizer), OUTPUT/tokens/, OUTPUT/checkpoints/, "
        "OUTPUT/profile.yaml, OUTPUT/metrics.json and OUTPUT/summary.json. Run it again after an interruption to "
        "resume. With pretrain.devices > 1 in the profile it starts torchrun, one process per GPU, each running "
        "`python -m pipeline.train.launch OUTPUT`. --prepare-only stops after the token files and profile.yaml: "
        "then start that entry under torchrun on each node (docs/deploy/pretrain-multinode.sh)."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--clean", required=True, metavar="DIR", help="a `kiln clean` output folder")
        parser.add_argument(
            "--tokenizer", required=True, metavar="DIR", help="a tokenizer folder (kiln tokenizer's OUTPUT/tokenizer)"
        )
        parser.add_argument("--output", "-o", required=True, metavar="DIR")
        parser.add_argument(
            "--prepare-only", action="store_true",
            help="pack the token files and write OUTPUT/profile.yaml, then stop (for torchrun across nodes)",
        )  # fmt: skip
        add_profile(parser)

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.config import load_profile
        from pipeline.layout import BaseModelFiles
        from pipeline.train.launch import build_base_model, prepare_run

        clean, profile = clean_folder(args.clean), load_profile(args.profile)
        output = writable_folder(Path(args.output))
        if args.prepare_only:
            stats = prepare_run(clean, Path(args.tokenizer), BaseModelFiles(output), profile)
            print(json.dumps(stats, indent=2))
            print(
                f"prepared {output}: start `python -m pipeline.train.launch {output}` under torchrun", file=sys.stderr
            )
            return 0
        result, baseline = build_base_model(clean, Path(args.tokenizer), output, profile)
        print(
            json.dumps(
                {"parameters": result.parameters, "val_loss": result.val_loss, "val_bpb": result.val_bpb,
                 "unigram_bpb": baseline, "tokens_per_s": result.tokens_per_s, "mfu": result.mfu, "loss": result.loss,
                 "resumed_from": result.resumed_from},
                indent=2,
            )
        )  # fmt: skip
        print(f"model in {BaseModelFiles(output).model}", file=sys.stderr)
        return 0


class Device(Command):
    help = "check this machine for training: GPU, bf16, the pretraining loss kernel, bitsandbytes' CUDA build"
    description = (
        "Print what the training stages will use here as JSON. Exits 2 when a CUDA GPU is present but "
        "bitsandbytes has no CUDA build (4-bit SFT and DPO would fail)."
    )

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.train.device import check_quantization_device, device_report

        print(json.dumps(device_report(), indent=2))
        check_quantization_device()
        return 0
