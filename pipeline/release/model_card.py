"""The model card and the registry bundle of one pipeline run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.config import Profile
from pipeline.io import atomic_path


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def build_bundle(work: Path, profile: Profile, run_id: str, out: Path, benchmark_table: str) -> dict:
    """Gather what a registered version holds into `out`: gguf/, hf/ (merged checkpoint and
    tokenizer), MODEL_CARD.md, benchmark.json, eval_report.json, clean_stats.json, profile.json. Returns the key
    metrics for tags."""
    base = _load(work / "base_model" / "summary.json")
    bench = _load(work / "gguf_benchmark" / "benchmark.json")
    clean = _load(work / "clean_corpus" / "stats.json")
    tok = _load(work / "tokenizer" / "stats.json")
    files = _load(work / "gguf_model" / "files.json")
    report_md = work / "eval_report" / "report.md"
    evals = report_md.read_text() if report_md.exists() else ""
    metrics = {
        "base_val_bpb": base.get("val_bpb"),
        "unigram_bpb": base.get("unigram_bpb"),
        "parameters": base.get("parameters"),
        **{f"{k}_tg128_tokens_per_s": v["tg128_tokens_per_s"]["median"] for k, v in bench.get("files", {}).items()},
        **{f"{k}_ppl_rel_diff": v["parity"]["perplexity_rel_diff"] for k, v in bench.get("files", {}).items()},
    }
    parity = all(v["parity"]["passed"] for v in bench.get("files", {}).values()) and bool(bench)
    card = f"""# kiln-{profile.name}

A Llama-architecture model pretrained from scratch by kiln, then QLoRA SFT and DPO, shipped as GGUF.
Pipeline run `{run_id}`.

## Data
{clean.get("input_documents")} documents in, {clean.get("kept_documents")} kept ({clean.get("kept_bytes")} bytes);
dropped by reason: {json.dumps(clean.get("dropped", {}))}; PII masked: {json.dumps(clean.get("pii", {}))};
split: {json.dumps(clean.get("splits", {}))}.

## Model
{base.get("parameters")} parameters; shape {json.dumps(profile.model.__dict__)}.
Tokenizer: {tok.get("vocab_size")} tokens, {json.dumps(tok.get("bytes_per_token", {}))} bytes per token.

## Training
Pretraining: {json.dumps(profile.pretrain.__dict__)}; validation bits per byte {base.get("val_bpb")}
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
    with atomic_path(out) as tmp:
        (tmp / "gguf").mkdir(parents=True)
        for path in files.values():
            shutil.copy2(path, tmp / "gguf" / Path(path).name)
        shutil.copytree(work / "dpo_model" / "model", tmp / "hf")
        (tmp / "MODEL_CARD.md").write_text(card)
        (tmp / "benchmark.json").write_text(json.dumps(bench, indent=2))
        if report_md.exists():
            shutil.copy2(work / "eval_report" / "report.json", tmp / "eval_report.json")
        (tmp / "clean_stats.json").write_text(json.dumps(clean, indent=2))
        (tmp / "profile.json").write_text(json.dumps(profile.to_dict(), indent=2, default=str))
    sizes = {Path(p).name: Path(p).stat().st_size for p in files.values()}
    return {"metrics": metrics, "parity": parity, "sizes": sizes}
