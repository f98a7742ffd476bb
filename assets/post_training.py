"""sft_data, dpo_data, sft_model and dpo_model."""

from pathlib import Path

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from assets.corpus import clean_corpus
from assets.feedback import feedback_pairs
from assets.metadata import log_to_mlflow, md_image, md_table
from assets.stage import ACCELERATOR, CPU, Stage, StageConfig
from assets.training import base_model
from pipeline.charts import loss_curve
from pipeline.data.clean import read_split
from pipeline.data.feedback import PAIRS_FILE, read_pairs
from pipeline.data.post_data import build_post_data, pair_check
from pipeline.io import within_context
from pipeline.train.dpo import train_dpo
from pipeline.train.lora import TuneResult
from pipeline.train.sft import sft_task_loss, train_sft
from resources import KilnSettings, MLflowTracking


def _data_asset(
    kind: str, context: AssetExecutionContext, config: StageConfig, kiln: KilnSettings
) -> MaterializeResult:
    profile, layout = kiln.load_with_layout()
    s, out, base = getattr(profile, kind), layout.post_data(kind), layout.model_dir("base")
    # DPO pairs are checked with the base checkpoint's tokenizer and trained context (what DPO
    # trains with): its config and tokenizer files are inputs, its weights are not.
    base_files = sorted(p for p in base.glob("*") if p.suffix in (".json", ".jinja")) if kind == "dpo" else []
    pairs = layout.feedback_pairs / PAIRS_FILE
    users = [pairs] if kind == "dpo" and pairs.is_file() else []  # users' judgements (feedback_pairs)
    inputs = [layout.clean_splits, *map(Path, s.files), *base_files, *users]
    stage = Stage.start(context, layout, config, s, inputs=inputs)
    if stage.reused:
        return stage.reuse()
    check, length = None, None
    if kind == "dpo":
        from transformers import AutoTokenizer

        length = within_context(s.max_length, base, "dpo.max_length")
        check = pair_check(AutoTokenizer.from_pretrained(str(base)), length)
    # Training rows from the train split; held-out rows from validation files pretraining never saw.
    train_split, validation = (read_split(layout.clean_splits, k) for k in ("train", "validation"))
    feedback = read_pairs(layout.feedback_pairs) if kind == "dpo" else []
    share = s.feedback_share if kind == "dpo" else 0.0
    stats = build_post_data(
        kind, train_split, s.files, out, s.max_pairs, s.eval_share, s.seed, check, validation, feedback, share
    )
    metadata = {
        "path": MetadataValue.path(str(out)),
        "train_rows": stats.train,
        "eval_rows": stats.eval,
        "held_out_from": stats.held_out_from,
        "sources": md_table(stats.sources, "source", "rows"),
        "rejected": md_table(stats.rejected, "reason", "rows"),
        "rejected_rows": sum(stats.rejected.values()),
    }
    if kind == "dpo":
        metadata["max_length"] = length
        metadata["corruption_kinds"] = md_table(stats.corruption_kinds, "rejected answer", "pairs")
        metadata["feedback_pairs"] = stats.sources.get("feedback_pairs", 0)
    return stage.finish(metadata)


@asset(group_name="post_training", code_version="3", deps=[clean_corpus], op_tags=CPU)
def sft_data(context: AssetExecutionContext, config: StageConfig, kiln: KilnSettings) -> MaterializeResult:
    """Instruction pairs (prompt -> completion, chat format): the profile's SFT files, or functions
    mined from the clean train split's code (signature and docstring -> the function). Mined held-out
    rows come from validation files that pretraining never saw and kiln's lm-eval tasks do not use."""
    return _data_asset("sft", context, config, kiln)


@asset(
    group_name="post_training", code_version="4", deps=[clean_corpus, base_model, feedback_pairs], op_tags=ACCELERATOR
)
def dpo_data(context: AssetExecutionContext, config: StageConfig, kiln: KilnSettings) -> MaterializeResult:
    """Preference pairs (prompt, chosen, rejected): the profile's files, or mined from code with the
    real function chosen and the same function with one fault put in rejected (held out: from
    validation files, as sft_data); and users' pairs from feedback_pairs, up to dpo.feedback_share of
    them, held out by prompt. Pairs whose prompt fills dpo.max_length (null: the trained context), or whose two
    answers are the same tokens within it, are dropped and counted by reason (`rejected`)."""
    return _data_asset("dpo", context, config, kiln)


def _tune_metadata(result: TuneResult, curve: bytes) -> dict:
    return {
        "trainable_parameters": result.trainable,
        "trainable_share": result.trainable / result.total,
        "steps": result.steps,
        "train_loss": result.train_loss,
        "tokens_per_s": result.tokens_per_s,
        "peak_memory_mb": result.peak_memory_mb,
        "train_seconds": result.seconds,
        "loss_curve": md_image(curve, "loss"),
    }


def _log_tune(log, result: TuneResult, metadata: dict, settings, curve: bytes, adapter_dir) -> None:
    log_to_mlflow(
        log, metadata, params=settings, files=[adapter_dir], images={"loss_curve.png": curve},
        history=result.history, history_keys=("loss", "grad_norm", "learning_rate", "rewards/margins"),
    )  # fmt: skip


def _curve(result: TuneResult, title: str) -> bytes:
    return loss_curve([h for h in result.history if "loss" in h], [], title)


@asset(group_name="post_training", code_version="4", deps=[base_model, sft_data], op_tags=ACCELERATOR)
def sft_model(
    context: AssetExecutionContext, config: StageConfig, kiln: KilnSettings, mlflow: MLflowTracking
) -> MaterializeResult:
    """QLoRA SFT: the base model in 4-bit NF4, LoRA on every projection, the chat template's special
    tokens' embedding rows trained in full, completion-only loss (TRL SFTTrainer); the adapter merged
    into full-precision base weights. Held-out completion loss (nats/token): `sft_loss_base` (the
    full-precision base), `sft_loss_adapter` (NF4 base + adapter, as trained), `sft_loss_merged`
    (the merged model that ships); `sft_loss_improvement` is base minus merged."""
    profile, layout = kiln.load_with_layout()
    settings = profile.sft
    stage = Stage.start(context, layout, config, settings, inputs=[layout.model_dir("base"), layout.post_data("sft")])
    if stage.reused:
        return stage.reuse()
    with mlflow.stage(context.run.run_id, profile.name, "sft_model") as log:
        result = train_sft(layout.model_dir("base"), layout.post_data("sft"), layout.stage_of("sft"), settings)
        context.log.info(
            f"sft: held-out completion loss {result.eval_loss_before:.3f} (base) -> "
            f"{result.eval_loss_adapter:.3f} (adapter) / {result.eval_loss_after:.3f} (merged)"
        )
        if not result.trainable_tokens:
            context.log.warning("sft: the chat template writes no special tokens, so no embedding row trains")
        curve = _curve(result, "sft_model")
        metadata = {
            "path": MetadataValue.path(str(layout.model_dir("sft"))),
            "sft_loss_base": result.eval_loss_before,
            "sft_loss_adapter": result.eval_loss_adapter,
            "sft_loss_merged": result.eval_loss_after,
            "sft_loss_improvement": result.eval_loss_before - result.eval_loss_after,
            "trainable_tokens": " ".join(result.trainable_tokens) or "none",
            "quantized_layers": result.quantized_modules,
            **_tune_metadata(result, curve),
        }
        _log_tune(log, result, metadata, settings, curve, layout.adapter_dir("sft"))
    return stage.finish(metadata)


def _feedback_figures(result) -> dict:
    """Preference accuracy on the held-out pairs from users' judgements alone (none: no such pairs)."""
    if result.feedback_before is None:
        return {"held_out_feedback_pairs": 0}
    return {
        "held_out_feedback_pairs": result.feedback_after.pairs,
        "preference_accuracy_feedback_before": result.feedback_before.accuracy,
        "preference_accuracy_feedback_after": result.feedback_after.accuracy,
    }


@asset(group_name="post_training", code_version="6", deps=[sft_model, dpo_data], op_tags=ACCELERATOR)
def dpo_model(
    context: AssetExecutionContext, config: StageConfig, kiln: KilnSettings, mlflow: MLflowTracking
) -> MaterializeResult:
    """DPO (TRL DPOTrainer) from the SFT checkpoint with LoRA, the adapter-disabled model as the
    frozen reference; the adapter merged into full-precision weights.

    On the held-out pairs, measured alike on the SFT checkpoint (before) and the merged DPO model
    (after), with answers tokenized and cut as DPO trains on them:
    preference_accuracy_before/after: share of pairs with log p(chosen|prompt) > log p(rejected|prompt);
    logp_margin_before/after: mean of log p(chosen|prompt) - log p(rejected|prompt), nats.
    eval_dpo_loss, trl_reward_margin/trl_reward_accuracy: TRL's held-out figures (sigmoid loss,
    reward = beta x log-prob change), from the same before/after log-probs; the loss before
    training is log 2 by definition (eval_dpo_loss_before_theoretical), not a measurement."""
    profile, layout = kiln.load_with_layout()
    settings = profile.dpo
    inputs = [layout.model_dir("sft"), layout.post_data("dpo"), layout.post_data("sft")]  # sft: the task-loss check
    stage = Stage.start(context, layout, config, settings, inputs)
    if stage.reused:
        return stage.reuse()
    with mlflow.stage(context.run.run_id, profile.name, "dpo_model") as log:
        result = train_dpo(layout.model_dir("sft"), layout.post_data("dpo"), layout.stage_of("dpo"), settings)
        sft_task = sft_task_loss(layout.model_dir("dpo"), layout.post_data("sft"))
        b, a = result.before, result.after
        context.log.info(
            f"dpo: held-out preference accuracy {b.accuracy:.3f} -> {a.accuracy:.3f}, "
            f"log-prob margin {b.margin:.3f} -> {a.margin:.3f} ({a.pairs} pairs)"
        )
        curve = _curve(result, "dpo_model")
        metadata = {
            "path": MetadataValue.path(str(layout.model_dir("dpo"))),
            "eval_dpo_loss": result.eval_loss_after,
            # not a measurement: the sigmoid DPO loss with the policy equal to its reference
            "eval_dpo_loss_before_theoretical": result.eval_loss_before,
            "held_out_pairs": a.pairs,
            "preference_accuracy_before": b.accuracy,
            "preference_accuracy_after": a.accuracy,
            "logp_margin_before": b.margin,
            "logp_margin_after": a.margin,
            "trl_reward_margin": result.reward_margin,
            "trl_reward_accuracy": result.reward_accuracy,
            "sft_task_eval_loss": sft_task,
            **_feedback_figures(result),
            **_tune_metadata(result, curve),
        }
        _log_tune(log, result, metadata, settings, curve, layout.adapter_dir("dpo"))
    return stage.finish(metadata)
