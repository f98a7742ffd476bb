"""The base_model stage in steps, and torchrun's entry to it.

    prepare_run   pack the token files (pipeline/train/pack.py) and write the profile into the run folder
    train_run     pretrain from that folder (every process under torchrun; rank 0 writes summary.json)
    build_base_model   both, on this process or, with `pretrain.devices` > 1, under torchrun

Under torchrun each process runs `python -m pipeline.train.launch RUN_DIR`: it reads the profile
and the token files `prepare_run` left in RUN_DIR (`BaseModelFiles`), so the training processes
never read the clean corpus, rebuild command lines or re-enter the CLI. Across nodes the same
entry runs on every node (docs/deploy/pretrain-multinode.sh), after one `kiln pretrain --prepare-only`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config import Profile, load_profile
from pipeline.errors import KilnError
from pipeline.io import read_json, write_json
from pipeline.layout import BaseModelFiles
from pipeline.train.distributed import Distributed, launched_by_torchrun, torchrun_command
from pipeline.train.pack import pack_tokens
from pipeline.train.pretrain import PretrainResult, count_parameters, pretrain
from pipeline.train.tokenizer import load_tokenizer, token_byte_lengths


def write_profile(profile: Profile, path: Path) -> None:
    """The whole profile as one self-contained YAML file (no `base:`), which `load_profile` reads back."""
    values = json.loads(json.dumps(dataclasses.asdict(profile)))  # tuples as lists: plain YAML
    values.pop("name")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False, allow_unicode=True), encoding="utf-8")


def prepare_run(clean_dir: Path, tokenizer_dir: Path, files: BaseModelFiles, profile: Profile) -> dict:
    """Token files, their stats (with the unigram baseline) and the profile, in the run folder."""
    stats = pack_tokens(clean_dir, tokenizer_dir, files)
    write_profile(profile, files.profile)
    return stats


def train_run(
    files: BaseModelFiles, profile: Profile, progress: bool = True, on_step=None, stop_after: int | None = None
) -> PretrainResult:
    """Pretrain from a prepared run folder; rank 0 writes `files.summary` once the run is finished.
    `stop_after`: end after that step of the run with a checkpoint, which the next start resumes."""
    stats = read_json(files.token_stats)
    tok = load_tokenizer(Path(stats["tokenizer"]))
    s = profile.pretrain
    result = pretrain(
        files.token_file("train"), files.token_file("validation"), tok, token_byte_lengths(tok), files.folder,
        profile.model, s, progress=progress, stop_after=stop_after, on_step=on_step,
    )  # fmt: skip
    if Distributed.from_env().main and result.steps == s.steps:
        write_json(files.summary, {
            "parameters": result.parameters,
            "parameters_budget": count_parameters(profile.model, len(tok)),
            "steps": result.steps,
            "final_train_loss": result.final_train_loss,
            "val_loss": result.val_loss,
            "val_bpb": result.val_bpb,
            "unigram_bpb": stats["unigram_bpb"],
            "tokens_seen": result.tokens_seen,
            "tokens_per_s": result.tokens_per_s,  # all devices together
            "mfu": result.mfu,  # per device
            "loss": result.loss,
            "devices": Distributed.from_env().world,
            "context_length": s.seq_len,
            "resumed_from": result.resumed_from,
        })  # fmt: skip
    return result


def build_base_model(
    clean_dir: Path, tokenizer_dir: Path, out_dir: Path, profile: Profile, progress=True, on_step=None
) -> tuple[PretrainResult, float]:
    """The base_model stage: `prepare_run`, then `train_run` here, or with `pretrain.devices` > 1
    under torchrun (one process per device running this module's entry on the run folder), reading
    the result back from the files rank 0 wrote. Returns (result, the unigram baseline's bits per byte)."""
    files, s = BaseModelFiles(Path(out_dir)), profile.pretrain
    if launched_by_torchrun():
        raise KilnError(
            "under torchrun, run `python -m pipeline.train.launch RUN_DIR` after `kiln pretrain --prepare-only`"
        )
    stats = prepare_run(clean_dir, tokenizer_dir, files, profile)
    if s.devices > 1:
        done = subprocess.run(torchrun_command(s.devices, ["pipeline.train.launch", str(files.folder)]), check=False)
        if done.returncode != 0:
            raise KilnError(f"pretraining on {s.devices} devices (pretrain.devices) failed: exit {done.returncode}")
        return result_from_files(files), stats["unigram_bpb"]
    return train_run(files, profile, progress, on_step), stats["unigram_bpb"]


def result_from_files(files: BaseModelFiles) -> PretrainResult:
    """The result of a finished run, from its summary and metrics."""
    summary, metrics = read_json(files.summary), read_json(files.metrics)
    return PretrainResult(
        summary["steps"], summary["tokens_seen"], summary["final_train_loss"], summary["val_loss"], summary["val_bpb"],
        summary["tokens_per_s"], summary["parameters"], summary["mfu"], summary["loss"],
        metrics["history"], metrics["evals"], summary["resumed_from"],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train.launch",
        description="Pretrain from a run folder prepared by `kiln pretrain --prepare-only` (its profile.yaml and "
        "token files); what torchrun starts in every process. Rank 0 writes the model, checkpoints and summary.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the prepared run folder (kiln pretrain's OUTPUT)")
    parser.add_argument(
        "--stop-after", type=int, metavar="STEP",
        help="end after this step of the run, with a checkpoint that the next start resumes (a job that "
        "trains in time-limited slots)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    files = BaseModelFiles(Path(args.run_dir))
    try:
        for needed in (files.profile, files.token_stats):
            if not needed.is_file():
                raise KilnError(f"{needed}: missing; prepare the run folder first (kiln pretrain --prepare-only)")
        train_run(files, load_profile(files.profile), stop_after=args.stop_after)
    except KilnError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
