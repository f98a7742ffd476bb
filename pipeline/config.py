"""Profiles: one named set of every size in the pipeline, as data.

The dataclasses here are the schema: one per section, a docstring per field, checks in
`__post_init__`. The profiles themselves are YAML files: the shipped ones in `profiles/`
(`tiny`, the default, runs the whole pipeline in minutes on a 2-core CPU; `small` is a stronger
CPU run of about an hour; `300m` is the full size meant for a GPU), and a user's own anywhere.
A file names a `base` (a shipped profile or another file) and overrides any field; without one
it starts from the defaults below. Each stage reads only its own section:

    base: tiny
    corpus:
      sources:
        - {path: /data/my_code}
        - {path: /data/notes.jsonl, text_field: body}
      max_bytes: 20_000_000

Every value is checked against its field's type (pipeline/schema.py); a wrong type or an unknown key is one
`ProfileError` line naming the file and the key, e.g. `my.yaml: pretrain.lr: expected a number, got 'fast'`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import KilnError
from pipeline.layout import PROFILES_DIR
from pipeline.schema import ProfileError, apply_values, read_yaml
from pipeline.sources import Source


@dataclass
class CorpusSettings:
    """raw_corpus: what to read and how much."""

    sources: list[Source] = field(
        default_factory=lambda: [
            Source(builtin="python_stdlib"),
            Source(builtin="korean_prose"),  # before the larger prose sources: taken whole
            Source(builtin="python_docs"),
            Source(builtin="python_docstrings"),
        ]
    )
    """Where the text comes from (files, folders, HF datasets, builtins); see `pipeline.sources.Source`."""
    code_share: float | None = 0.6
    """Share of bytes that is code (the rest prose); None keeps every document of every source."""
    max_bytes: int | None = 4_000_000
    """Bytes of text to take in all; None takes everything the sources hold."""
    max_doc_chars: int = 32_000
    """Longer files are split at blank lines into documents of at most about this many characters."""
    seed: int = 0
    """Seed for the order in which files of a folder are sampled."""

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, Source) else Source(**s) for s in self.sources]
        if not self.sources:
            raise ProfileError("corpus.sources: at least one source is needed")
        if self.code_share is not None and not 0 <= self.code_share <= 1:
            raise ProfileError(f"corpus.code_share must be in [0, 1], not {self.code_share}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ProfileError(f"corpus.max_bytes must be positive, not {self.max_bytes}")


@dataclass
class CleanSettings:
    """clean_corpus: dedup thresholds, sampling and the split."""

    minhash_threshold: float = 0.8
    """Jaccard similarity above which two documents count as near duplicates."""
    minhash_ngrams: int = 5
    """Words per shingle for MinHash."""
    minhash_hashes: int = 112
    """Hash functions per signature; split into bands to match `minhash_threshold`."""
    short_doc_chars: int = 200
    """Documents shorter than this are sampled down (they carry little to learn from)."""
    short_doc_keep: float = 0.5
    """Share of short documents kept (chosen by a hash of the id, so the same every run)."""
    validation_share: float = 0.05
    """Share of clean documents held out for validation, from every training stage."""
    tasks: int | None = 1
    """datatrove tasks (and local worker processes); more splits the work for several cores;
    None: one per CPU core of the machine that loads the profile."""
    executor: str = "local"
    """Where datatrove runs the steps: local (worker processes on this machine), ray (a Ray
    cluster, `clean.ray_address`; the `ray` extra), slurm (job arrays through
    docs/deploy/clean_slurm.py, which submits and finishes the run outside the pipeline)."""
    ray_address: str | None = None
    """The Ray cluster's address (host:port of `ray start --head`); null: $RAY_ADDRESS, else a
    Ray instance started on this machine for the run."""

    def __post_init__(self) -> None:
        if self.tasks is None:
            self.tasks = os.cpu_count() or 1
        if not 0.0 < self.minhash_threshold < 1.0:
            raise ProfileError(f"clean.minhash_threshold must be in (0, 1), not {self.minhash_threshold}")
        if not 0.0 <= self.short_doc_keep <= 1.0:
            raise ProfileError(f"clean.short_doc_keep must be in [0, 1], not {self.short_doc_keep}")
        if not 0.0 < self.validation_share < 0.5:
            raise ProfileError(f"clean.validation_share must be in (0, 0.5), not {self.validation_share}")
        if self.executor not in ("local", "ray", "slurm"):
            raise ProfileError(f"clean.executor must be local, ray or slurm, not {self.executor!r}")
        if self.minhash_hashes < 8 or self.minhash_ngrams < 1 or self.tasks < 1:
            raise ProfileError("clean.minhash_hashes must be >= 8, minhash_ngrams and tasks >= 1")


@dataclass
class TokenizerSettings:
    """tokenizer: the byte-level BPE."""

    vocab_size: int = 32_000
    """Tokens in all, special tokens included."""
    min_frequency: int = 2
    """A pair must occur this often in the training text to become a merge."""
    max_train_bytes: int | None = None
    """Bytes of the train split the BPE trainer reads; None reads it all."""

    def __post_init__(self) -> None:
        if self.vocab_size > 65_535:  # token ids are stored as uint16 on disk
            raise ProfileError(f"tokenizer.vocab_size {self.vocab_size} is over 65,535")
        if self.min_frequency < 1:
            raise ProfileError("tokenizer.min_frequency must be at least 1")


@dataclass
class ModelShape:
    """base_model: the Llama architecture's sizes. Hidden and MLP sizes are multiples of 256,
    which llama.cpp's K-quants need."""

    hidden_size: int = 256
    """Width of the residual stream."""
    intermediate_size: int = 768
    """Width of the SwiGLU MLP."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention (query) heads; hidden_size / num_heads is the head dimension."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); divides num_heads."""
    max_position: int | None = None
    """The context the model declares (config.json's max_position_embeddings, the GGUF's
    context_length). It is the length it trains at: null means pretrain.seq_len, and any other
    number is refused, since positions past the trained length would be declared but never trained."""
    rope_theta: float = 10_000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the input embedding and the output projection (most of a small model's weights)."""
    from_pretrained: str | None = None
    """A Hugging Face model id (fetched first with `kiln download ID`) or a save_pretrained folder:
    base_model starts from it instead of pretraining, the tokenizer is its own, and the sizes above
    and the tokenizer and pretrain sections are not used. None: pretrain kiln's own model."""
    revision: str | None = None
    """The branch, tag or commit of `from_pretrained` (a hub id) to use; None: the one downloaded as main."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 256:
                raise ProfileError(f"model.{name} {getattr(self, name)} is not a multiple of 256")
        if self.hidden_size % self.num_heads:
            raise ProfileError(f"model.hidden_size {self.hidden_size} does not divide by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ProfileError("model: the head dimension hidden_size / num_heads must be even for RoPE")
        if self.num_heads % self.num_kv_heads:
            raise ProfileError(f"model.num_heads {self.num_heads} does not divide by num_kv_heads {self.num_kv_heads}")
        if self.num_layers < 1:
            raise ProfileError("model.num_layers must be at least 1")
        if self.from_pretrained is not None and not self.from_pretrained.strip():
            raise ProfileError("model.from_pretrained: give a model id (org/name) or a folder, or null")


@dataclass
class PretrainSettings:
    """base_model: the training run."""

    seq_len: int = 128
    """Tokens per packed training sequence: the trained context. The model declares it, and every
    evaluation, the GGUF, its benchmark, serving and SFT/DPO stay within it."""
    micro_batch: int = 8
    """Sequences per forward pass."""
    grad_accum: int = 1
    """Forward passes per optimizer step; the batch is micro_batch * grad_accum sequences."""
    steps: int = 150
    """Optimizer steps."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 15
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    eval_every: int = 50
    """Validation loss and bits per byte every this many steps (and at the end)."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation."""
    checkpoint_every: int = 50
    """Steps between resumable checkpoints."""
    seed: int = 0
    """Seed of the weights, the data order and every random generator."""
    compile: str = "auto"
    """torch.compile: auto (on CUDA only), on, off."""
    precision: str = "auto"
    """auto (bf16 autocast where the device multiplies bf16 natively: a bf16 GPU, a CPU with
    AVX512-BF16 or AMX; else fp32), bf16, fp32. Weights and optimizer state stay fp32 either way."""
    devices: int = 1
    """GPUs to train on, data-parallel; above 1, `kiln pretrain` and the base_model asset start torchrun."""

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch", "grad_accum", "steps", "eval_every", "eval_batches", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ProfileError(f"pretrain.{name} must be at least 1")
        if self.devices < 1:
            raise ProfileError("pretrain.devices must be at least 1")
        if self.compile not in ("auto", "on", "off"):
            raise ProfileError(f"pretrain.compile must be auto, on or off, not {self.compile!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ProfileError(f"pretrain.precision must be auto, bf16 or fp32, not {self.precision!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ProfileError(f"pretrain.warmup_steps {self.warmup_steps} must be below steps {self.steps}")


@dataclass
class SFTSettings:
    """sft_data and sft_model: the instruction set and QLoRA fine-tuning."""

    files: list[str] = field(default_factory=list)
    """Your SFT files (JSONL, TRL's conversational `messages`); empty mines pairs from the clean corpus."""
    max_pairs: int = 200
    """Instruction pairs mined from code (signature and docstring -> function)."""
    eval_share: float = 0.1
    """Share of pairs held out to measure the SFT task's loss."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scale numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    steps: int = 30
    """Optimizer steps."""
    batch: int = 4
    """Rows per device batch."""
    grad_accum: int = 1
    """Batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (cosine schedule). QLoRA and TRL's recipes use 1e-4..2e-4 for 7B models;
    small models take larger steps: on tiny (30 steps) 2e-4 lowered the held-out completion loss
    of the merged model by 0.04 nats, 1e-3 by 0.17."""
    max_length: int | None = None
    """Tokens per row; longer rows are truncated. null: the trained context (pretrain.seq_len);
    a longer one is refused."""
    seed: int = 0
    """Seed of the adapter init and the data order."""

    def __post_init__(self) -> None:
        if not 0 < self.eval_share < 0.5:
            raise ProfileError(f"eval_share must be in (0, 0.5), not {self.eval_share}")
        if min(self.lora_r, self.steps, self.batch, self.grad_accum, self.max_pairs, self.max_length or 1) < 1:
            raise ProfileError("lora_r, steps, batch, grad_accum, max_pairs and max_length must be at least 1")


@dataclass
class DPOSettings(SFTSettings):
    """dpo_data and dpo_model: the preference set and DPO from the SFT checkpoint."""

    files: list[str] = field(default_factory=list)
    """Your preference files (JSONL with prompt, chosen, rejected); empty mines pairs from the clean corpus."""
    max_pairs: int = 120
    """Preference pairs mined from code (chosen: the real function; rejected: a wrong one)."""
    beta: float = 0.1
    """DPO's KL strength: higher keeps the model closer to the reference."""
    sft_weight: float = 0.0
    """Weight of an SFT term added to DPO's loss: the mean negative log-likelihood of the chosen
    answers' tokens (TRL's `sft` loss type beside `sigmoid`). 0 is plain DPO. Plain DPO can raise
    the preference accuracy by making the chosen answers less likely too: on small, 2e-3 for 60
    steps gave held-out accuracy 0.484 -> 0.659 but bits per byte 1.783 -> 1.988 and SFT task
    loss 5.10 -> 5.96; with sft_weight 1, 0.495 -> 0.637 with the task loss 5.10 -> 5.03 and bits
    per byte +0.013 (profiles/small.yaml)."""
    quantize: bool = False
    """Load the SFT checkpoint in 4-bit NF4 (QLoRA) for DPO too."""
    steps: int = 20
    """Optimizer steps."""
    lr: float = 5e-4
    """Peak learning rate (cosine schedule). TRL's and the alignment handbook's LoRA DPO recipes
    use 5e-6..5e-5 for 7B models; a model of a few tens of millions of parameters with a rank-16
    adapter and 20 steps barely moves there. On tiny, 1e-3 for 20 steps lowered the held-out
    log-prob margin (4.62 -> 4.38 nats) and accuracy (6/7 -> 5/7); 5e-4 for 60 kept the accuracy
    and 1e-4 for 60 left both where they were. On small, 5e-4 for 20 steps left the policy at the
    reference (DPO loss 0.688); 2e-3 for 60 raised the accuracy on 91 held-out pairs from 0.484 to
    0.659 and the margin from -5.08 to +5.29 nats, and raised bits per byte from 1.783 to 1.988
    (profiles/small.yaml)."""
    max_length: int | None = None
    """Tokens per prompt plus answer; longer pairs are truncated. null: the trained context
    (pretrain.seq_len); a longer one is refused."""
    feedback_share: float = 0.5
    """Largest share of the pairs that users' judgements of served answers (the `feedback_pairs`
    asset) may fill when any exist: up to feedback_share x max_pairs of them, the rest mined or
    from `files`. Held out by prompt like the mined pairs by file; 0 leaves them out."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.feedback_share <= 1:
            raise ProfileError(f"dpo.feedback_share must be between 0 and 1, not {self.feedback_share}")
        if self.beta <= 0:
            raise ProfileError(f"dpo.beta must be positive, not {self.beta}")
        if self.sft_weight < 0:
            raise ProfileError(f"dpo.sft_weight must be 0 or more, not {self.sft_weight}")


@dataclass
class GGUFSettings:
    """gguf_model and gguf_benchmark."""

    eval_tokens: int = 4096
    """Held-out tokens the perplexity parity is measured on."""
    window: int | None = None
    """Tokens per perplexity window (each window is evaluated from an empty context). null: the
    trained context (pretrain.seq_len); a longer one is refused."""
    price_per_hour: float = 0.10
    """Hourly price of the machine that serves the model, for the cost per million tokens."""
    latency_requests: int = 100
    """Short requests timed for the latency P50/P95/P99: at least 100, so P99 is not one sample's noise."""
    quick: bool = False
    """One repeat instead of three, at most 20 latency requests (the table says so), one context size for memory."""

    def __post_init__(self) -> None:
        if self.eval_tokens < 2 or (self.window is not None and self.window < 1) or self.price_per_hour < 0:
            raise ProfileError("gguf: eval_tokens >= 2, window >= 1 and price_per_hour >= 0 are needed")
        if self.latency_requests < 100:
            raise ProfileError(
                f"gguf.latency_requests must be at least 100, not {self.latency_requests} (quick: true for a short run)"
            )


@dataclass
class EvalSettings:
    """eval_report: what base, SFT, DPO (and the shipped GGUF) are measured on."""

    bpb_max_bytes: int | None = 400_000
    """Held-out validation bytes scored for bits per byte (None: the whole split)."""
    lm_eval_limit: int | None = 200
    """Documents per lm-eval task (None: all of them)."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    """Standard lm-eval task names run besides kiln's own (hellaswag, arc_easy, ...); one whose
    data cannot be loaded is reported as unavailable."""
    batch_size: int = 8
    """Sequences per forward pass in bits per byte and lm-eval."""
    humaneval_problems: int | None = 20
    """The first this many HumanEval problems (None: all 164)."""
    humaneval_samples: int = 1
    """Completions per problem: 1 is greedy decoding; more are sampled at `temperature`."""
    temperature: float = 0.8
    """Sampling temperature when humaneval_samples > 1."""
    pass_k: list[int] = field(default_factory=lambda: [1])
    """The k of each pass@k reported (k <= humaneval_samples)."""
    max_new_tokens: int = 64
    """Tokens generated per completion at most; generation also stops at a new top-level statement.
    It must leave room in the trained context: a prompt longer than the rest keeps its end."""
    timeout: float = 5.0
    """Seconds each generated program may run in the sandbox."""
    unsafe_sandbox: bool = False
    """Run HumanEval completions without bubblewrap's isolation (resource limits only): for a
    machine where bubblewrap cannot run, by someone who accepts running untrusted code."""
    gguf_file: str | None = "Q4_K_M"
    """The GGUF quantization also evaluated on HumanEval through llama.cpp (None: none)."""

    def __post_init__(self) -> None:
        if self.humaneval_samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.timeout <= 0:
            raise ProfileError("eval: humaneval_samples, max_new_tokens, batch_size >= 1 and timeout > 0 are needed")
        bad = [k for k in self.pass_k if not 1 <= k <= self.humaneval_samples]
        if bad:
            raise ProfileError(f"eval.pass_k {bad[0]} must be between 1 and humaneval_samples {self.humaneval_samples}")
        if self.gguf_file not in (None, "F16", "Q8_0", "Q4_K_M"):
            raise ProfileError(f"eval.gguf_file must be F16, Q8_0, Q4_K_M or null, not {self.gguf_file!r}")
        if self.humaneval_problems is not None and not 1 <= self.humaneval_problems <= 164:
            raise ProfileError("eval.humaneval_problems must be between 1 and 164 (or null for all)")


TUNE_OBJECTIVES = ("humaneval", "kiln_next_line", "kiln_next_line_prefix")  # pipeline.release.tuning scores each


@dataclass
class SearchSpace:
    """sampling_preset: the llama.cpp sampler values the study searches. Each is `[low, high]`
    (searched), `[value]` (fixed) or `[]` (left at the default preset's value)."""

    temperature: list[float] = field(default_factory=lambda: [0.0, 1.2])
    """Softmax temperature; 0 is greedy."""
    top_p: list[float] = field(default_factory=lambda: [0.5, 1.0])
    """Nucleus sampling: the smallest set of tokens holding this much probability."""
    top_k: list[int] = field(default_factory=lambda: [1, 100])
    """Only the k most likely tokens (0: all)."""
    min_p: list[float] = field(default_factory=lambda: [0.0, 0.3])
    """Drop tokens less likely than min_p times the most likely one."""
    repeat_penalty: list[float] = field(default_factory=lambda: [1.0, 1.3])
    """Divide the logits of recently seen tokens by this."""
    max_tokens: list[int] = field(default_factory=lambda: [64, 128])
    """New tokens per completion at most."""

    def __post_init__(self) -> None:
        floors = {"temperature": 0, "top_p": 1e-6, "top_k": 0, "min_p": 0, "repeat_penalty": 1e-6, "max_tokens": 1}
        for name, floor in floors.items():
            r = getattr(self, name)
            if len(r) > 2 or any(v < floor for v in r) or (len(r) == 2 and r[0] > r[1]):
                raise ProfileError(f"tune.space.{name}: expected [], [value] or [low, high], {floor} <= low <= high")
        if any(v > 1 for v in self.top_p + self.min_p):
            raise ProfileError("tune.space: top_p and min_p are at most 1")

    def searched(self) -> dict[str, list]:
        """The ranges actually searched (low < high)."""
        return {k: r for k, r in dataclasses.asdict(self).items() if len(r) == 2 and r[0] < r[1]}


@dataclass
class TuneSettings:
    """sampling_preset and `kiln tune`: an Optuna study over the shipped GGUF's sampler values."""

    objective: str = "humaneval"
    """What the study maximises on held-out data: humaneval (pass@1 on the last `problems` HumanEval
    problems, in the sandbox), kiln_next_line (the next line of held-out code, exact match) or
    kiln_next_line_prefix (the share of that line written right before the first wrong character:
    a graded score that separates samplers on a model too small to pass a HumanEval problem)."""
    problems: int = 8
    """Held-out items scored per trial (HumanEval problems, or lines of held-out code)."""
    trials: int = 6
    """Trials the study holds when done (finished or pruned); a resumed study runs only the rest."""
    timeout: float | None = 40.0
    """Seconds of tuning at most per run (None: no limit); trials then stop, the best one is kept."""
    min_tokens_per_s: float = 20.0
    """The latency budget: a trial generating fewer tokens per second is infeasible."""
    min_speed_share: float = 0.5
    """The latency budget relative to greedy decoding, measured at the start of the same study on
    the same items (a figure of this machine under this load, not an absolute one): a trial
    generating less than this share of greedy's tokens per second is infeasible."""
    seed: int = 0
    """Seed of the TPE sampler and of llama.cpp's sampling in every trial."""
    threads: int = 1
    """llama.cpp threads while tuning: what one kiln serve replica gets (cores / replicas)."""
    storage: str | None = None
    """Optuna storage URL shared by workers (postgresql+psycopg2://user@host/db); None: sqlite in the work folder."""
    space: SearchSpace = field(default_factory=SearchSpace)
    """The sampler values searched."""

    def __post_init__(self) -> None:
        if self.objective not in TUNE_OBJECTIVES:
            known = ", ".join(TUNE_OBJECTIVES)
            raise ProfileError(f"tune.objective: unknown objective {self.objective!r} (known: {known})")
        if not 0 <= self.min_speed_share <= 1:
            raise ProfileError(f"tune.min_speed_share must be in [0, 1], not {self.min_speed_share}")
        if min(self.problems, self.trials, self.threads) < 1 or self.min_tokens_per_s < 0:
            raise ProfileError("tune: problems, trials and threads >= 1 and min_tokens_per_s >= 0 are needed")
        if self.timeout is not None and self.timeout <= 0:
            raise ProfileError(f"tune.timeout must be positive or null, not {self.timeout}")


@dataclass
class RunSettings:
    """`kiln run`: how one Dagster run executes its steps."""

    max_concurrent: int = 1
    """Steps run at once, each in its own process (Dagster's multiprocess executor); steps tagged
    `kiln/compute: accelerator` (training, GGUF, benchmark, tuning) still one at a time. 1: every
    step in the run's one process, which on a few cores is faster than a process per step that
    imports torch and Dagster again."""

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ProfileError("run.max_concurrent must be at least 1")


@dataclass
class RegistrySettings:
    """registered_model: the quality gate before the `candidate` alias."""

    max_regression: float = 0.05
    """Relative worsening of the shipped model's validation bits per byte, against the current
    production version, that still passes the gate."""
    max_score_drop: float = 0.05
    """Absolute drop of an accuracy or pass@k (against production, and from the HF model to
    its quantized GGUF) that still passes the gate."""


@dataclass
class Profile:
    """Every size of one pipeline run."""

    name: str
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    clean: CleanSettings = field(default_factory=CleanSettings)
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)
    model: ModelShape = field(default_factory=ModelShape)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    sft: SFTSettings = field(default_factory=SFTSettings)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    gguf: GGUFSettings = field(default_factory=GGUFSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    tune: TuneSettings = field(default_factory=TuneSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        if self.model.from_pretrained is None:  # a downloaded model's context is its own config's
            check_within_context(self)

    @property
    def context(self) -> int:
        """The trained context of kiln's own model (a downloaded model's is in its config.json)."""
        return self.pretrain.seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_within_context(profile: Profile) -> None:
    """One rule for every length past pretraining: it may not exceed the trained context, where
    the model has never seen a position. A longer one is refused, naming the setting; null
    lengths take the trained context."""
    ctx = profile.pretrain.seq_len
    if profile.model.max_position not in (None, ctx):
        raise ProfileError(
            f"model.max_position {profile.model.max_position} is not the trained context pretrain.seq_len {ctx}: "
            "leave it out, or train at it"
        )
    lengths = {"sft.max_length": profile.sft.max_length, "dpo.max_length": profile.dpo.max_length,
               "gguf.window": profile.gguf.window}  # fmt: skip
    for key, value in lengths.items():
        if value is not None and value > ctx:
            raise ProfileError(f"{key} {value} exceeds the trained context pretrain.seq_len {ctx}")
    if profile.eval.max_new_tokens >= ctx:
        raise ProfileError(
            f"eval.max_new_tokens {profile.eval.max_new_tokens} leaves no room for a prompt in the trained "
            f"context pretrain.seq_len {ctx}"
        )


DEFAULT_PROFILE = "tiny"
PROFILE_NAMES = tuple(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
"""The shipped profiles: the files in `profiles/`, by name."""


def load_profile(name_or_path: str | os.PathLike | None = None) -> Profile:
    """A shipped profile by name, or a YAML file: its `base` (a shipped name or another file),
    then its own settings over it.

    With no argument, the profile named by the KILN_PROFILE environment variable, else tiny.
    """
    name_or_path = str(name_or_path or os.environ.get("KILN_PROFILE") or DEFAULT_PROFILE)
    if name_or_path in PROFILE_NAMES:
        return _load_file(PROFILES_DIR / f"{name_or_path}.yaml", ())
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        raise ProfileError(f"unknown profile {name_or_path!r}: choose {', '.join(PROFILE_NAMES)} or a .yaml file")
    return _load_file(path, ())


def _load_file(path: Path, chain: tuple[Path, ...]) -> Profile:
    """The profile `path` describes; `chain` holds the files that named it as their base, to catch a cycle."""
    if not path.is_file():
        raise ProfileError(f"{path}: profile file not found")
    if path.resolve() in chain:
        cycle = " -> ".join(p.name for p in (*chain, path.resolve()))
        raise ProfileError(f"{path}: base profiles form a cycle ({cycle})")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        profile = Profile(name=path.stem)  # no base: the dataclass defaults
    else:
        profile = dataclasses.replace(_load_file(_base_file(base, path), (*chain, path.resolve())), name=path.stem)
    try:
        return apply_values(profile, data, "")
    except KilnError as exc:  # a type, an unknown key or a section's own check: it names the setting
        raise ProfileError(f"{path}: {exc}") from None


def _base_file(base: Any, naming: Path) -> Path:
    """The file of `base:` in `naming`: a shipped profile's name, or a path relative to `naming`'s folder."""
    if isinstance(base, str) and base in PROFILE_NAMES:
        return PROFILES_DIR / f"{base}.yaml"
    if not isinstance(base, str) or Path(base).suffix not in (".yaml", ".yml"):
        raise ProfileError(f"{naming}: base {base!r} is not a profile ({', '.join(PROFILE_NAMES)}) or a .yaml file")
    return naming.parent / base  # an absolute base stays absolute
