"""sft_model: QLoRA supervised fine-tuning with TRL's SFTTrainer.

The base model is loaded in 4-bit NF4 (bitsandbytes, double quantization), LoRA adapters go on
every attention and MLP projection, the embedding rows of the special tokens the chat template
writes (<|bos|>, the roles, <|end|>) train in full, and the loss counts only the completion (the
assistant's answer), not the prompt. The adapter is saved, then merged into a full-precision copy
of the base weights: the result is a plain HF checkpoint.

The task loss is measured three times on the held-out rows: the full-precision base, the adapter
as trained (NF4 base + adapter) and the merged full-precision model that ships. The adapter and
the merged model share every trained weight and differ only by the NF4 rounding of the base.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import SFTSettings
from pipeline.io import read_jsonl, within_context
from pipeline.train.lora import (
    TuneResult,
    expose_head_bias,
    history_callback,
    load_for_training,
    load_full_precision,
    lora_config,
    merge_into,
    peak_memory_mb,
    reset_peak_memory,
    score_completions_only,
    tokens_seen,
    trainable_parameters,
    training_arguments,
    tuning_datasets,
)
from pipeline.train.tokenizer import chat_token_ids


@dataclass
class SFTResult(TuneResult):
    """Held-out completion losses (nats/token): eval_loss_before is the full-precision base's,
    eval_loss_after the merged model's (what ships)."""

    quantized_modules: int  # linear layers trained in 4-bit NF4
    eval_loss_adapter: float  # NF4 base + adapter, the model as trained
    trainable_tokens: list[str]  # special tokens whose embedding rows trained


@torch.no_grad()
def completion_loss(model, tokenizer, rows: list[dict]) -> float:
    """Mean loss (nats/token) of the completions given their prompts: the SFT task's measure,
    the same for the base, SFT and DPO models."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][: model.config.max_position_embeddings]
        ids = torch.tensor([ids], device=device)  # cut at the trained context, as the trainer cuts a row
        logits = model(input_ids=ids).logits[0, :-1].float()
        targets = ids[0, 1:]
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[len(p_ids) - 1 :]
        total += losses.sum().item()
        count += losses.numel()
    return total / max(count, 1)


def make_sft_trainer(
    base_checkpoint: Path, data_dir: Path, out_dir: Path, s: SFTSettings, history: list, cpu_head: bool = True
):
    """The SFTTrainer on a 4-bit NF4 base with LoRA adapters and trainable chat-token rows, and the
    held-out rows. `cpu_head`: score only the completion tokens on a CPU (`score_completions_only`);
    False keeps TRL's own head (the tests compare the two)."""
    from peft import get_peft_model
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(base_checkpoint))
    train, _, held_rows = tuning_datasets(data_dir, s.batch, "SFT")
    base = load_for_training(base_checkpoint, quantize=True)
    model = get_peft_model(base, lora_config(s.lora_r, s.lora_alpha, s.lora_dropout, chat_token_ids(tokenizer)))
    expose_head_bias(model)
    args = training_arguments(
        SFTConfig, out_dir, s.steps, s.batch, s.grad_accum, s.lr, s.seed,
        max_length=within_context(s.max_length, base_checkpoint, "sft.max_length"),
        completion_only_loss=True, packing=False,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[history_callback(history)]
    )
    if cpu_head:
        score_completions_only(trainer.model)
    return trainer, tokenizer, held_rows


def train_sft(base_checkpoint: Path, data_dir: Path, out_dir: Path, s: SFTSettings) -> SFTResult:
    reset_peak_memory()  # this stage's own peak, not that of a stage before it in this process
    history: list[dict] = []
    trainer, tokenizer, held_rows = make_sft_trainer(base_checkpoint, data_dir, out_dir, s, history)
    trainable, total = trainable_parameters(trainer.model)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    adapter = completion_loss(trainer.model, tokenizer, held_rows)
    trainer.model.save_pretrained(out_dir / "adapter")
    full = load_full_precision(base_checkpoint)  # one copy: measured as the base, then merged into
    before = completion_loss(full, tokenizer, held_rows)
    after = completion_loss(merge_into(full, out_dir / "adapter", tokenizer, out_dir / "model"), tokenizer, held_rows)
    return SFTResult(
        trainable=trainable, total=total, steps=out.global_step, train_loss=out.training_loss,
        eval_loss_before=before, eval_loss_after=after, tokens_per_s=tokens_seen(history) / seconds,
        peak_memory_mb=peak_memory_mb(), seconds=seconds, train_rows=len(trainer.train_dataset),
        eval_rows=len(held_rows), history=history, quantized_modules=count_4bit(trainer.model),
        eval_loss_adapter=adapter, trainable_tokens=tokenizer.convert_ids_to_tokens(chat_token_ids(tokenizer)),
    )  # fmt: skip


def count_4bit(model) -> int:
    """Linear layers held in bitsandbytes 4-bit."""
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def sft_task_loss(checkpoint: Path, sft_data_dir: Path) -> float:
    """The completion loss of any checkpoint on the held-out SFT rows: base, SFT and DPO compare."""
    from transformers import AutoTokenizer

    model = load_full_precision(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    return completion_loss(model, tokenizer, list(read_jsonl(Path(sft_data_dir) / "eval.jsonl")))
