"""tokenizer and base_model, with their quality gates."""

import json
from pathlib import Path

from dagster import AssetCheckResult, AssetExecutionContext, MaterializeResult, MetadataValue, asset, asset_check

from assets.corpus import clean_corpus
from assets.metadata import log_to_mlflow, md_image
from assets.stage import ACCELERATOR, CPU, Stage, StageConfig
from pipeline.charts import loss_curve
from pipeline.data.clean import read_split
from pipeline.io import read_json
from pipeline.train import hub
from pipeline.train.launch import build_base_model
from pipeline.train.pretrained import pretrained_base, pretrained_tokenizer
from pipeline.train.tokenizer import build_tokenizer
from resources import KilnSettings, MLflowTracking

PARAMETER_LIMIT = 300_000_000


@asset(group_name="training", code_version="3", deps=[clean_corpus], op_tags=CPU)
def tokenizer(
    context: AssetExecutionContext, config: StageConfig, kiln: KilnSettings, mlflow: MLflowTracking
) -> MaterializeResult:
    """A 32,000-token byte-level BPE (GPT-2 pre-tokenization) with bos/eos/pad, chat-role and
    fill-in-the-middle tokens and a chat template, trained on the clean train split; or, with
    `model.from_pretrained` in the profile, that model's own tokenizer, measured the same way."""
    profile, layout = kiln.load_with_layout()
    m = profile.model
    settings = {"tokenizer": profile.tokenizer, "from_pretrained": m.from_pretrained, "revision": m.revision}
    stage = Stage.start(context, layout, config, settings, inputs=[layout.clean_splits, *_snapshot(m)])
    if stage.reused:
        return stage.reuse()
    if m.from_pretrained:
        validation = list(read_split(layout.clean_splits, "validation"))
        stats = pretrained_tokenizer(m.from_pretrained, m.revision, layout.tokenizer_dir, validation)
    else:
        stats = build_tokenizer(layout.clean_splits, layout.tokenizer_dir, profile)
    source = f"from_pretrained {m.from_pretrained}" if m.from_pretrained else "trained on the clean train split"
    context.log.info(f"tokenizer ({source}): {stats['vocab_size']} tokens, bytes/token {stats['bytes_per_token']}")
    bpt = stats["bytes_per_token"]
    metadata = {
        "source": source,
        "path": MetadataValue.path(str(layout.tokenizer)),
        "vocab_size": stats["vocab_size"],
        "bytes_per_token_validation": bpt["validation"],
        "bytes_per_token_code": bpt["code"] or float("nan"),
        "bytes_per_token_prose": bpt["prose"] or float("nan"),
        "bytes_per_token_english": bpt.get("english") or float("nan"),
        "bytes_per_token_korean": bpt.get("korean") or float("nan"),
    }
    with mlflow.stage(context.run.run_id, profile.name, "tokenizer") as log:
        params = {"from_pretrained": m.from_pretrained} if m.from_pretrained else profile.tokenizer
        log_to_mlflow(log, metadata, params=params, files=[layout.tokenizer, layout.tokenizer_stats])
    return stage.finish(metadata)


@asset_check(asset=tokenizer, blocking=True, description="Held-out text (code, English, Korean, emoji) round-trips.")
def tokenizer_round_trip(kiln: KilnSettings) -> AssetCheckResult:
    stats = read_json(kiln.layout.tokenizer_stats)
    failures = stats["round_trip_failures"]
    return AssetCheckResult(
        passed=not failures, metadata={"texts": stats["round_trip_texts"], "failures": MetadataValue.json(failures)}
    )


@asset(group_name="training", code_version="6", deps=[tokenizer], op_tags=ACCELERATOR)
def base_model(
    context: AssetExecutionContext, config: StageConfig, kiln: KilnSettings, mlflow: MLflowTracking
) -> MaterializeResult:
    """A Llama-architecture model (RMSNorm, RoPE, SwiGLU, GQA) pretrained from scratch on the
    packed train split; resumes from its last checkpoint if a run was interrupted. With
    `model.from_pretrained`, that model instead, measured on the same validation split."""
    profile, layout = kiln.load_with_layout()
    settings = {"model": profile.model, "pretrain": profile.pretrain}
    inputs = [layout.clean_splits, layout.tokenizer, *_snapshot(profile.model)]
    stage = Stage.start(context, layout, config, settings, inputs=inputs)
    if stage.reused:
        return stage.reuse()
    if profile.model.from_pretrained:
        return stage.finish(_pretrained_base_model(context, profile, layout, mlflow))

    def log_step(row: dict) -> None:
        if "val_loss" in row or row["step"] % 10 == 0:
            context.log.info(json.dumps(row))

    with mlflow.stage(context.run.run_id, profile.name, "base_model") as log:  # system metrics while training
        result, baseline = build_base_model(
            layout.clean_splits, layout.tokenizer, layout.base_files.folder, profile, on_step=log_step
        )
        curve = loss_curve(result.history, result.evals, f"base_model ({profile.name})")
        metadata = {
            "path": MetadataValue.path(str(layout.model_dir("base"))),
            "parameters": result.parameters,
            "steps": result.steps,
            "tokens_seen": result.tokens_seen,
            "tokens_per_s": result.tokens_per_s,
            **({"mfu": result.mfu} if result.mfu is not None else {}),  # None off the peak-FLOPs table (and on CPU)
            "loss_kernel": result.loss,
            "final_train_loss": result.final_train_loss,
            "val_loss": result.val_loss,
            "val_bits_per_byte": result.val_bpb,
            "unigram_bits_per_byte": baseline,
            "context_length": profile.pretrain.seq_len,  # trained, and declared in config.json
            "resumed_from_step": result.resumed_from,
            "loss_curve": md_image(curve, "loss"),
        }
        log_to_mlflow(
            log, metadata, params={"model": profile.model.__dict__, "pretrain": profile.pretrain.__dict__},
            files=[layout.base_summary, layout.base_metrics], images={"loss_curve.png": curve},
            history=result.history + result.evals,
            history_keys=("loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_bpb"),
        )  # fmt: skip
    return stage.finish(metadata)


def _pretrained_base_model(context: AssetExecutionContext, profile, layout, mlflow: MLflowTracking) -> dict:
    """base_model for `model.from_pretrained`: the downloaded weights, no training; its metadata."""
    m = profile.model
    train, validation = ([r["text"] for r in read_split(layout.clean_splits, k)] for k in ("train", "validation"))
    with mlflow.stage(context.run.run_id, profile.name, "base_model") as log:
        s = pretrained_base(
            m.from_pretrained, m.revision, layout.tokenizer, layout.stage_of("base"), train, validation,
            window=profile.pretrain.seq_len,
        )  # fmt: skip
        context.log.info(f"base_model: {m.from_pretrained} ({s['parameters']:,} parameters), not trained here")
        metadata = {
            "source": f"from_pretrained {m.from_pretrained}",
            "path": MetadataValue.path(str(layout.model_dir("base"))),
            "parameters": s["parameters"],
            "val_bits_per_byte": s["val_bpb"],
            "unigram_bits_per_byte": s["unigram_bpb"],
        }
        log_to_mlflow(log, metadata, params={"from_pretrained": m.from_pretrained, "snapshot": s["snapshot"]},
                      files=[layout.base_summary])  # fmt: skip
    return metadata


def _snapshot(m) -> list[Path]:
    """The downloaded checkpoint a `from_pretrained` profile starts from, as a stage input."""
    return [hub.resolve(m.from_pretrained, m.revision)] if m.from_pretrained else []


@asset_check(asset=base_model, blocking=True, description="Validation bits per byte beat a unigram model's.")
def base_model_beats_unigram(kiln: KilnSettings) -> AssetCheckResult:
    s = read_json(kiln.layout.base_summary)
    return AssetCheckResult(
        passed=s["val_bpb"] < s["unigram_bpb"], metadata={"val_bpb": s["val_bpb"], "unigram_bpb": s["unigram_bpb"]}
    )


@asset_check(asset=base_model, blocking=True, description="The model has at most 300M parameters.")
def base_model_parameter_budget(kiln: KilnSettings) -> AssetCheckResult:
    n = read_json(kiln.layout.base_summary)["parameters"]
    return AssetCheckResult(passed=n <= PARAMETER_LIMIT, metadata={"parameters": n, "limit": PARAMETER_LIMIT})
