"""The tokenizer and base_model stages end to end: from the clean corpus folder to artifacts.

The assets and `kiln pretrain` both call these two functions; the pieces they compose live in
`pipeline.train.tokenizer` and `pipeline.train.pretrain`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Profile
from pipeline.data.clean import read_split
from pipeline.io import write_json
from pipeline.train.pretrain import PretrainResult, count_parameters, pretrain, tokenize_to_file, unigram_bpb
from pipeline.train.tokenizer import (
    ROUND_TRIP_SAMPLES,
    bytes_per_token,
    load_tokenizer,
    round_trip_failures,
    texts_of,
    token_byte_lengths,
    train_tokenizer,
)


def build_tokenizer(clean_dir: Path, out_dir: Path, profile: Profile) -> dict:
    """Train the tokenizer on the train split; measure it on the validation split."""
    settings = profile.tokenizer
    tok = train_tokenizer(
        texts_of(read_split(clean_dir, "train"), settings.max_train_bytes),
        out_dir / "tokenizer",
        settings.vocab_size,
        settings.min_frequency,
    )
    val = list(read_split(clean_dir, "validation"))
    code = [r["text"] for r in val if r["lang"] not in ("en", "ko", "other", "unknown")]
    prose = [r["text"] for r in val if r["lang"] in ("en", "ko", "other", "unknown")]
    stats = {
        "vocab_size": len(tok),
        "bytes_per_token": {
            "validation": bytes_per_token(tok, code + prose),
            "code": bytes_per_token(tok, code) if code else None,
            "prose": bytes_per_token(tok, prose) if prose else None,
        },
        "round_trip_failures": round_trip_failures(tok, [r["text"] for r in val] + ROUND_TRIP_SAMPLES),
        "round_trip_texts": len(val) + len(ROUND_TRIP_SAMPLES),
    }
    write_json(out_dir / "stats.json", stats)
    return stats


def build_base_model(
    clean_dir: Path, tokenizer_dir: Path, out_dir: Path, profile: Profile, progress=True, on_step=None
):
    """Tokenize both splits to packed token files, then pretrain. Returns (result, unigram bpb)."""
    tok = load_tokenizer(tokenizer_dir)
    tokens = out_dir / "tokens"
    tokenize_to_file(texts_of(read_split(clean_dir, "train")), tok, tokens / "train.bin")
    tokenize_to_file(texts_of(read_split(clean_dir, "validation")), tok, tokens / "validation.bin")
    token_bytes = token_byte_lengths(tok)
    baseline = unigram_bpb(tokens / "train.bin", tokens / "validation.bin", len(tok), token_bytes)
    result: PretrainResult = pretrain(
        tokens / "train.bin", tokens / "validation.bin", tok, token_bytes, out_dir, profile.model, profile.pretrain,
        progress=progress, on_step=on_step,
    )  # fmt: skip
    write_json(
        out_dir / "summary.json",
        {
            "parameters": result.parameters,
            "parameters_budget": count_parameters(profile.model, len(tok)),
            "val_loss": result.val_loss,
            "val_bpb": result.val_bpb,
            "unigram_bpb": baseline,
            "tokens_seen": result.tokens_seen,
            "tokens_per_s": result.tokens_per_s,
            "resumed_from": result.resumed_from,
        },
    )
    return result, baseline
