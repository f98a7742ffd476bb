"""What SFT and DPO share: their data files, loading a checkpoint (4-bit NF4 for QLoRA), LoRA
adapters, training arguments for the device, a loss-history callback, merging the adapter into
full weights, and the figures every tuning run reports."""

from __future__ import annotations

import contextlib
import resource
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.errors import KilnError
from pipeline.io import atomic_path, read_jsonl

# Every attention and MLP projection of the Llama block gets an adapter.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TuneResult:
    """What one LoRA tuning run measured; SFT and DPO each add their own figures."""

    trainable: int  # parameters the adapters train
    total: int  # parameters of the whole model, adapters included
    steps: int
    train_loss: float
    eval_loss_before: float  # on the held-out rows; before training the adapters are zero
    eval_loss_after: float
    tokens_per_s: float
    peak_memory_mb: float
    seconds: float
    train_rows: int
    eval_rows: int
    history: list[dict]  # every dict the trainer logged, with its step


def tuning_datasets(data_dir: Path, batch: int, what: str):
    """train.jsonl and eval.jsonl of an sft_data or dpo_data folder: (train, held-out) as
    `datasets.Dataset`, and the held-out rows as dicts."""
    from datasets import Dataset

    train, held = list(read_jsonl(data_dir / "train.jsonl")), list(read_jsonl(data_dir / "eval.jsonl"))
    if len(train) < batch:
        raise KilnError(f"{data_dir / 'train.jsonl'}: {len(train)} {what} rows, fewer than one batch of {batch}")
    return Dataset.from_list(train), Dataset.from_list(held), held


def reset_peak_memory() -> None:
    """Start a stage's own peak: CUDA's allocator peak, and on a CPU the process's resident
    high-water mark (VmHWM, reset to the current RSS by writing 5 to /proc/self/clear_refs), so an
    SFT run in the process that pretrained reports its own peak, not pretraining's."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb() -> float:
    """The peak since `reset_peak_memory` (GPU memory allocated, or the process's resident
    high-water mark on a CPU; ru_maxrss, the whole run's, where /proc is not there)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def tokens_seen(history: list[dict]) -> float:
    """Tokens trained on, from the trainer's own `num_tokens` log."""
    counts = [h["num_tokens"] for h in history if "num_tokens" in h]
    return float(counts[-1]) if counts else 0.0


def compute_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def load_for_training(checkpoint: Path, quantize: bool):
    """The checkpoint ready for LoRA: 4-bit NF4 with double quantization (QLoRA) when `quantize`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not (Path(checkpoint) / "config.json").is_file():
        raise KilnError(f"{checkpoint}: not a model folder (no config.json)")
    kwargs = {"dtype": compute_dtype(), "device_map": "cuda" if torch.cuda.is_available() else "cpu"}
    if quantize:
        from peft import prepare_model_for_kbit_training

        from pipeline.train.device import check_quantization_device

        check_quantization_device()

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,  # quantize the quantization constants too
            bnb_4bit_compute_dtype=compute_dtype(),
        )
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), **kwargs)
        # casts norms to fp32 and enables input gradients, so LoRA trains stably on 4-bit weights
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return AutoModelForCausalLM.from_pretrained(str(checkpoint), **kwargs)


def lora_config(r: int, alpha: int, dropout: float, trainable_tokens: list[int] | None = None):
    """LoRA on LORA_TARGETS; `trainable_tokens` are embedding rows trained in full besides (peft's
    trainable tokens: only those rows' deltas are stored, and with tied embeddings the output
    layer follows the same rows)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
        trainable_token_indices=trainable_tokens or None,
    )  # fmt: skip


def expose_head_bias(model) -> None:
    """With tied embeddings peft wraps the output layer too, so the trained token rows score their
    tokens; TRL's fused LM head reads `lm_head.weight` (the wrapper gives the rows with their
    deltas) and `lm_head.bias`, which the wrapper lacks. A bias-free head gets `bias = None`."""
    from peft.utils.other import TrainableTokensWrapper

    for module in model.modules():
        if isinstance(module, TrainableTokensWrapper) and getattr(module.token_adapter.base_layer, "bias", 0) is None:
            module.bias = None


# Config fields with which a model's head is more than `hidden @ weight.T (+ bias)`: TRL's head handles them.
_SCALED_HEAD = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def score_completions_only(model) -> bool:
    """Give the trainer's model a CPU head that scores only the answer tokens; True when it did.

    DPOTrainer and SFTTrainer ask the model for per-token log-probs with `fused_lm_head=True`. Without Triton
    (on a CPU) TRL's fused head scores every position, prompt and padding included, and folds the
    32k-wide logits through about a dozen elementwise torch passes forward and as many backward:
    two thirds of small's DPO step. This head computes the same log-probs (and the entropy, mean
    logit and top-1 flags TRL logs) from the logits of the labelled positions only, with one
    log-softmax, and is left off where the head is scaled or capped (TRL's then stays)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config()
    if next(base.parameters()).device.type != "cpu" or any(getattr(config, k, None) for k in _SCALED_HEAD):
        return False
    if getattr(config, "output_router_logits", False):
        return False
    trl_forward = base.forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, **kwargs):
        if not fused_lm_head or shift_labels is not None:
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels, **kwargs)
        from trl.trainer.utils import FusedCausalLMOutput

        self.kiln_head_calls += 1  # the tests check TRL still asks for this head: a newer TRL may not
        kwargs.pop("num_items_in_batch", None)
        hidden = self.base_model(*args, **{**kwargs, "use_cache": False}).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        targets = labels[mask]
        head = self.get_output_embeddings()
        logits = F.linear(hidden[mask], head.weight, head.bias).float()
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(1, targets[:, None])[:, 0]
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
            mean_logits, is_top1 = logits.mean(-1), logits.argmax(-1) == targets  # argmax: the first maximum

        def spread(x):  # per position, zero where the label is -100, as TRL's head returns them
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        log_probs = spread(picked)
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / mask.sum().clamp(min=1), log_probs=log_probs, entropy=spread(entropy),
            mean_logits=spread(mean_logits), is_top1=spread(is_top1), label_mask=mask,
        )  # fmt: skip

    base.kiln_head_calls = 0
    base.forward = types.MethodType(forward, base)
    return True


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def training_arguments(cls, out_dir: Path, steps: int, batch: int, grad_accum: int, lr: float, seed: int, **extra):
    """TRL config `cls` (SFTConfig, DPOConfig) with kiln's defaults for this device."""
    on_gpu = torch.cuda.is_available()
    return cls(
        output_dir=str(out_dir / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        logging_steps=1,
        eval_strategy="no",  # kiln evaluates once at the end, on the held-out slice
        save_strategy="no",  # the adapter and the merged model are saved by kiln
        report_to="none",  # metrics go to the asset metadata (and MLflow through kiln)
        seed=seed,
        data_seed=seed,
        use_cpu=not on_gpu,
        bf16=compute_dtype() == torch.bfloat16,
        dataloader_num_workers=0,
        disable_tqdm=False,
        gradient_checkpointing=False,  # small models fit; recomputing activations would cost a third more time
        **extra,
    )


def history_callback(history: list):
    """A TrainerCallback that appends every logged dict (with its step) to `history`."""
    from transformers import TrainerCallback

    class _History(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                history.append({"step": state.global_step, "time": time.time(), **logs})

    return _History()


def load_full_precision(checkpoint: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)


def merge_into(base, adapter_dir: Path, tokenizer, out: Path):
    """Merge the LoRA adapter (and its trained token rows) into `base`, a full-precision model
    (merging into the 4-bit weights would lose precision), and save a plain HF checkpoint with the
    tokenizer, generating until <|end|> or <|eos|>; returns the merged model."""
    from peft import PeftModel

    from pipeline.train.tokenizer import set_stop_tokens

    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    set_stop_tokens(merged, tokenizer)
    with atomic_path(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return merged
