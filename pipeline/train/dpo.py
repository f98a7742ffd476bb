"""dpo_model: Direct Preference Optimization with TRL's DPOTrainer, from the SFT checkpoint.

LoRA adapters (on 4-bit NF4 weights when the profile asks for QLoRA) are trained against a
frozen reference: with an adapter, TRL's reference is the same network with the adapter
switched off, so no second copy of the weights is held. Reward margins and preference
accuracy are measured on a held-out slice of pairs before and after training; the adapter is
merged into full-precision weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DPOSettings
from pipeline.io import within_context
from pipeline.train.lora import (
    TuneResult,
    history_callback,
    load_for_training,
    lora_config,
    merge_adapter,
    peak_memory_mb,
    tokens_seen,
    trainable_parameters,
    training_arguments,
    tuning_datasets,
)


@dataclass
class DPOResult(TuneResult):
    """eval_loss_* is the held-out DPO loss; margins and accuracies are measured on the same pairs
    (None where the trainer did not report them)."""

    pairs_per_s: float
    margin_before: float | None  # mean reward margin, chosen minus rejected
    margin_after: float | None
    accuracy_before: float | None  # share of pairs whose chosen answer scores higher
    accuracy_after: float | None


def train_dpo(sft_checkpoint: Path, data_dir: Path, out_dir: Path, s: DPOSettings) -> DPOResult:
    from peft import get_peft_model
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(sft_checkpoint))
    train, held, _ = tuning_datasets(data_dir, s.batch, "preference")
    model = get_peft_model(
        load_for_training(sft_checkpoint, s.quantize), lora_config(s.lora_r, s.lora_alpha, s.lora_dropout)
    )
    trainable, total = trainable_parameters(model)
    history: list[dict] = []
    args = training_arguments(
        DPOConfig, out_dir, s.steps, s.batch, s.grad_accum, s.lr, s.seed, beta=s.beta,
        max_length=within_context(s.max_length, sft_checkpoint, "dpo.max_length"),
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=train, eval_dataset=held,
        processing_class=tokenizer, callbacks=[history_callback(history)],
    )  # fmt: skip
    before = trainer.evaluate()
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    after = trainer.evaluate()
    trainer.model.save_pretrained(out_dir / "adapter")
    merge_adapter(sft_checkpoint, out_dir / "adapter", tokenizer, out_dir / "model")
    pairs = s.steps * s.batch * s.grad_accum
    return DPOResult(
        trainable=trainable, total=total, steps=out.global_step, train_loss=out.training_loss,
        eval_loss_before=before["eval_loss"], eval_loss_after=after["eval_loss"],
        tokens_per_s=tokens_seen(history) / seconds, peak_memory_mb=peak_memory_mb(), seconds=seconds,
        train_rows=len(train), eval_rows=len(held), history=history, pairs_per_s=pairs / seconds,
        margin_before=before.get("eval_rewards/margins"), margin_after=after.get("eval_rewards/margins"),
        accuracy_before=before.get("eval_rewards/accuracies"), accuracy_after=after.get("eval_rewards/accuracies"),
    )  # fmt: skip
