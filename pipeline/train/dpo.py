"""dpo_model: Direct Preference Optimization with TRL's DPOTrainer, from the SFT checkpoint.

LoRA adapters (on 4-bit NF4 weights when the profile asks for QLoRA) are trained against a
frozen reference: with an adapter, TRL's reference is the same network with the adapter
switched off, so no second copy of the weights is held. The adapter is merged into
full-precision weights.

Before and after are measured the same way on the held-out pairs: the SFT checkpoint DPO starts
from, then the merged model that ships. For each pair, the log-probability of each answer given
the prompt (summed over the answer's tokens, at the length DPO trains at); the preference
accuracy is the share of pairs where the chosen answer is the likelier, the margin the mean of
log p(chosen) - log p(rejected) in nats. TRL's held-out DPO loss, reward margin and accuracy
are computed from the same two measurements, the merged model against the SFT checkpoint as its
reference (before training they are log 2, 0 and 0 by construction).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import DPOSettings
from pipeline.data.post_data import FEEDBACK_EVAL, encode_pair
from pipeline.io import read_jsonl, within_context
from pipeline.train.lora import (
    TuneResult,
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


@dataclass
class Preference:
    """How a model ranks the held-out pairs (see the module docstring)."""

    accuracy: float  # share of pairs with log p(chosen | prompt) > log p(rejected | prompt)
    margin: float  # mean of log p(chosen | prompt) - log p(rejected | prompt), nats
    pairs: int
    logps: list[tuple[float, float]]  # (log p(chosen | prompt), log p(rejected | prompt)) per pair


@dataclass
class DPOResult(TuneResult):
    """eval_loss_* is the held-out DPO loss; `before` is the SFT checkpoint's preference on the
    held-out pairs, `after` the merged DPO model's, measured alike. The reward margin and accuracy
    are TRL's, of the merged model against the SFT checkpoint (`dpo_figures`)."""

    pairs_per_s: float
    before: Preference
    after: Preference
    reward_margin: float | None
    reward_accuracy: float | None
    feedback_before: Preference | None = None  # the same on the held-out pairs from users' judgements alone
    feedback_after: Preference | None = None
    # eval_loss_before is not measured: it is the theoretical DPO loss at the start, log 2 (the
    # policy is its reference, every reward 0, -log sigmoid(0) = log 2), whatever the data.
    eval_loss_before_measured: bool = False


DPO_LOSS_AT_START = math.log(2)  # theoretical, not measured: see DPOResult.eval_loss_before_measured


@torch.no_grad()
def answer_logps(model, tokenizer, rows: list[dict], max_length: int) -> list[tuple[float, float]]:
    """(log p(chosen | prompt), log p(rejected | prompt)) per row, summed over the answer tokens
    that fit in `max_length` with the prompt: the pair tokenized and cut as DPOTrainer does."""
    device = next(model.parameters()).device
    out = []
    for row in rows:
        prompt, *answers = encode_pair(tokenizer, row)
        pair = []
        for answer in answers:
            ids = (prompt + answer)[:max_length]
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0]
            pair.append(logp[max(len(prompt) - 1, 0) :].sum().item())  # logp[i] scores token i + 1
        out.append((pair[0], pair[1]))
    return out


def preference(model, tokenizer, rows: list[dict], max_length: int) -> Preference:
    """The preference accuracy and log-probability margin of `model` on `rows`."""
    logps = answer_logps(model, tokenizer, rows, max_length)
    if not logps:
        return Preference(accuracy=float("nan"), margin=float("nan"), pairs=0, logps=[])
    diffs = [c - r for c, r in logps]
    return Preference(
        accuracy=sum(d > 0 for d in diffs) / len(diffs), margin=sum(diffs) / len(diffs), pairs=len(diffs), logps=logps
    )


def dpo_figures(before: Preference, after: Preference, beta: float) -> tuple[float, float, float]:
    """(DPO loss, reward margin, reward accuracy) of the `after` model against the `before` one as
    its reference, as TRL defines them for the sigmoid loss: the reward of an answer is beta x
    (log p_after - log p_before); the loss is the mean of -log sigmoid(chosen reward - rejected
    reward), the margin the mean of that difference, the accuracy the share where it is positive."""
    if not before.pairs:
        return float("nan"), float("nan"), float("nan")
    margins = [beta * ((ac - bc) - (ar - br)) for (bc, br), (ac, ar) in zip(before.logps, after.logps, strict=True)]
    loss = sum(-F.logsigmoid(torch.tensor(m, dtype=torch.float64)).item() for m in margins) / len(margins)
    return loss, sum(margins) / len(margins), sum(m > 0 for m in margins) / len(margins)


def _full_precision(checkpoint: Path):
    return load_full_precision(checkpoint).to("cuda" if torch.cuda.is_available() else "cpu").eval()


def held_out_preference(checkpoint: Path, rows: list[dict], max_length: int) -> Preference:
    """`preference` of the model at `checkpoint`."""
    from transformers import AutoTokenizer

    return preference(_full_precision(checkpoint), AutoTokenizer.from_pretrained(str(checkpoint)), rows, max_length)


def make_dpo_trainer(sft_checkpoint: Path, data_dir: Path, out_dir: Path, s: DPOSettings, cpu_head: bool = True):
    """TRL's DPOTrainer as dpo_model runs it: (trainer, tokenizer, held-out rows, max_length, history).
    `cpu_head`: score only the answer tokens on a CPU (`score_completions_only`); False keeps
    TRL's own head (the benchmark and the tests compare the two)."""
    from peft import get_peft_model
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(sft_checkpoint))
    train, held, held_rows = tuning_datasets(data_dir, s.batch, "preference")
    max_length = within_context(s.max_length, sft_checkpoint, "dpo.max_length")
    model = get_peft_model(
        load_for_training(sft_checkpoint, s.quantize), lora_config(s.lora_r, s.lora_alpha, s.lora_dropout)
    )
    history: list[dict] = []
    # dpo.sft_weight adds the chosen answers' log-likelihood, so they do not lose probability too
    loss = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, s.sft_weight]} if s.sft_weight else {}
    args = training_arguments(
        DPOConfig, out_dir, s.steps, s.batch, s.grad_accum, s.lr, s.seed, beta=s.beta,
        max_length=max_length, **loss,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=train, eval_dataset=held,
        processing_class=tokenizer, callbacks=[history_callback(history)],
    )  # fmt: skip
    if cpu_head:
        score_completions_only(trainer.model)
    return trainer, tokenizer, held_rows, max_length, history


def train_dpo(sft_checkpoint: Path, data_dir: Path, out_dir: Path, s: DPOSettings) -> DPOResult:
    reset_peak_memory()  # this stage's own peak, not that of a stage before it in this process
    trainer, tokenizer, held_rows, max_length, history = make_dpo_trainer(sft_checkpoint, data_dir, out_dir, s)
    trainable, total = trainable_parameters(trainer.model)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    trainer.model.save_pretrained(out_dir / "adapter")
    full = _full_precision(sft_checkpoint)  # one copy: measured as the start, then merged into
    users = list(read_jsonl(data_dir / FEEDBACK_EVAL)) if (data_dir / FEEDBACK_EVAL).is_file() else []
    before_pref = preference(full, tokenizer, held_rows, max_length)
    users_before = preference(full, tokenizer, users, max_length) if users else None
    merged = merge_into(full, out_dir / "adapter", tokenizer, out_dir / "model")
    after_pref = preference(merged, tokenizer, held_rows, max_length)
    users_after = preference(merged, tokenizer, users, max_length) if users else None
    # TRL's held-out figures from the two measurements above, instead of its evaluation pass: that
    # pass ran both models over the held-out pairs a second time.
    eval_loss, reward_margin, reward_accuracy = dpo_figures(before_pref, after_pref, s.beta)
    pairs = s.steps * s.batch * s.grad_accum
    return DPOResult(
        trainable=trainable, total=total, steps=out.global_step, train_loss=out.training_loss,
        eval_loss_before=DPO_LOSS_AT_START, eval_loss_after=eval_loss,  # theoretical: policy = reference
        tokens_per_s=tokens_seen(history) / seconds, peak_memory_mb=peak_memory_mb(), seconds=seconds,
        train_rows=len(trainer.train_dataset), eval_rows=len(held_rows), history=history, pairs_per_s=pairs / seconds,
        before=before_pref, after=after_pref,
        reward_margin=reward_margin, reward_accuracy=reward_accuracy,
        feedback_before=users_before, feedback_after=users_after,
    )  # fmt: skip
