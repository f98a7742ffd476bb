"""The model card and the registry bundle of one pipeline run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.config import Profile
from pipeline.io import atomic_path, read_json
from pipeline.layout import Layout
from pipeline.release.gguf_bench import markdown_table
from pipeline.release.registry import SHIPPED, model_name


def _load(path: Path) -> dict:
    return read_json(path) if path.exists() else {}


def build_bundle(layout: Layout, profile: Profile, run_id: str) -> dict:
    """Gather what a registered version holds into `layout.bundle_dir`: gguf/, hf/ (merged checkpoint
    and tokenizer), MODEL_CARD.md, benchmark.json, eval_report.json, clean_stats.json, profile.json,
    presets.json.
    Returns the key metrics for tags, whether GGUF parity passed, and each GGUF file's size."""
    base, bench, clean = _load(layout.base_summary), _load(layout.benchmark_json), _load(layout.clean_stats)
    files = _load(layout.gguf_files)
    evals = layout.eval_markdown.read_text() if layout.eval_markdown.exists() else ""
    parity = all(v["parity"]["passed"] for v in bench.get("files", {}).values()) and bool(bench)
    card = model_card(profile, run_id, base, clean, _load(layout.tokenizer_stats), evals, bench, parity)
    _write_bundle(layout, profile, files, card, bench, clean)
    sizes = {Path(p).name: Path(p).stat().st_size for p in files.values()}
    return {"metrics": _key_metrics(base, bench), "parity": parity, "sizes": sizes}


def _key_metrics(base: dict, bench: dict) -> dict:
    """What the registered version is tagged with: base model figures, GGUF speed and parity."""
    return {
        "base_val_bpb": base.get("val_bpb"),
        "unigram_bpb": base.get("unigram_bpb"),
        "parameters": base.get("parameters"),
        "context_length": base.get("context_length"),
        **{
            f"{k}_tg{v['tg_tokens']}_tokens_per_s": v["tg_tokens_per_s"]["median"]
            for k, v in bench.get("files", {}).items()
        },
        **{f"{k}_ppl_rel_diff": v["parity"]["perplexity_rel_diff"] for k, v in bench.get("files", {}).items()},
    }


def model_card(
    profile: Profile, run_id: str, base: dict, clean: dict, tok: dict, evals: str, bench: dict, parity: bool
) -> str:
    """MODEL_CARD.md: data, model, training, evaluation, GGUF measurements and lineage of one run."""
    benchmark_table = markdown_table(bench["files"]) if bench else ""
    origin = (
        f"Fine-tuned from {base['from_pretrained']} (a downloaded model, not pretrained by kiln)"
        if base.get("from_pretrained")
        else "A Llama-architecture model pretrained from scratch by kiln"
    )
    return f"""# {model_name(profile.name)}

{origin}, then QLoRA SFT and DPO, shipped as GGUF.
Pipeline run `{run_id}`.

## Data
{clean.get("input_documents")} documents in, {clean.get("kept_documents")} kept ({clean.get("kept_bytes")} bytes);
dropped by reason: {json.dumps(clean.get("dropped", {}))}; PII masked: {json.dumps(clean.get("pii", {}))};
split: {json.dumps(clean.get("splits", {}))}.

## Model
{base.get("parameters")} parameters; {_shape(profile, base)}.
Tokenizer: {tok.get("vocab_size")} tokens, {json.dumps(tok.get("bytes_per_token", {}))} bytes per token.

## Training
Pretraining: {_pretraining(profile, base)}; validation bits per byte {base.get("val_bpb")}
(unigram baseline {base.get("unigram_bpb")}).
SFT (QLoRA, NF4): steps {profile.sft.steps}, LoRA r {profile.sft.lora_r}.
DPO: steps {profile.dpo.steps}, beta {profile.dpo.beta}.

## Evaluation (held-out data; HumanEval in a sandbox)
{evals or "(no eval_report)"}
## GGUF files and llama.cpp measurements (parity {"passed" if parity else "FAILED"})
{benchmark_table}

## Lineage
raw_corpus -> clean_corpus -> tokenizer -> base_model -> sft_model -> dpo_model -> gguf_model -> gguf_benchmark,
eval_report
"""


def _shape(profile: Profile, base: dict) -> str:
    if base.get("from_pretrained"):
        return f"the shape of {base['from_pretrained']} (its config.json is in hf/)"
    return f"shape {json.dumps(profile.model.__dict__)}"


def _pretraining(profile: Profile, base: dict) -> str:
    return "none here (downloaded)" if base.get("from_pretrained") else json.dumps(profile.pretrain.__dict__)


def _write_bundle(layout: Layout, profile: Profile, files: dict, card: str, bench: dict, clean: dict) -> None:
    """The bundle folder, written under a temporary name and renamed when complete."""
    with atomic_path(layout.bundle_dir) as tmp:
        (tmp / "gguf").mkdir(parents=True)
        for path in files.values():
            shutil.copy2(path, tmp / "gguf" / Path(path).name)
        shutil.copytree(layout.model_dir(SHIPPED), tmp / "hf")
        (tmp / "MODEL_CARD.md").write_text(card)
        (tmp / "benchmark.json").write_text(json.dumps(bench, indent=2))
        if layout.eval_markdown.exists():
            shutil.copy2(layout.eval_report, tmp / "eval_report.json")
        (tmp / "clean_stats.json").write_text(json.dumps(clean, indent=2))
        (tmp / "profile.json").write_text(json.dumps(profile.to_dict(), indent=2, default=str))
        if layout.presets_json.exists():  # sampling_preset's: the gateway reads it from the pulled version
            shutil.copy2(layout.presets_json, tmp / "presets.json")
