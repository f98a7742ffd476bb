"""Where every artifact lives. One `Layout` names every path; nothing else spells them.

    <work_dir>/<profile>/
        raw_corpus/raw.jsonl
        clean_corpus/{clean/,rejected/,logs/,stats.json}
        tokenizer/{tokenizer/,stats.json}
        base_model/{model/,tokens/,checkpoints/,profile.yaml,summary.json,metrics.json}
        sft_data/, dpo_data/                 train.jsonl, eval.jsonl, rejected.jsonl, stats.json
        sft_model/, dpo_model/               {adapter/,model/,trainer/}
        gguf_model/{kiln-<profile>-<quant>.gguf,files.json}
        gguf_benchmark/benchmark.json
        eval_report/{report.json,report.md,humaneval/,lm_eval_tasks/}
        sampling_preset/{presets.json,study.json,study.db}
        registered_model/bundle/
        .hashes.json, timings.jsonl          input hashes by size+mtime; seconds per stage and run
        <stage>/.stage.json                  a finished stage's key and result (pipeline/reuse.py)

The work folder is `data/work` in the checkout unless `KILN_WORK_DIR` names another; models
downloaded from the Hugging Face hub are kept beside the profiles in `<work_dir>/model_cache/`
(or `KILN_MODEL_CACHE`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK_DIR = REPO_ROOT / "data" / "work"
REGISTRY_DIR = REPO_ROOT / "registry"  # the local MLflow store (sqlite + artifacts)
DAGSTER_HOME = REPO_ROOT / ".dagster_home"
SERVICES_DIR = REPO_ROOT / ".services"  # the production deployment on one machine (pipeline/deploy/services.py)
PROFILES_DIR = REPO_ROOT / "profiles"  # the shipped profiles, one YAML file each
PRESETS_DIR = REPO_ROOT / "presets"  # the gateway's sampler presets, one YAML file each
QUANTS = ("F16", "Q8_0", "Q4_K_M")  # the GGUF files every version ships


def cache_dir() -> Path:
    """Per-machine files kept between runs: the llama-server build, versions pulled for serving.
    `KILN_CACHE_DIR`, else ~/.cache/kiln."""
    return Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln")


def services_dir_from_env() -> Path:
    """PostgreSQL, the tracking server's artifacts and the Dagster home of `make services`:
    `KILN_SERVICES_DIR`, else .services/ in the checkout."""
    return Path(os.environ.get("KILN_SERVICES_DIR") or SERVICES_DIR)


PROMETHEUS_TARGETS_ENV = "KILN_PROMETHEUS_TARGETS"
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"  # the alert rules, their tests, the Grafana dashboard


def prometheus_targets_from_env() -> Path | None:
    """The folder where a running `kiln serve` announces itself to the Prometheus of `make services`
    (file-based discovery): `KILN_PROMETHEUS_TARGETS`, else none."""
    folder = os.environ.get(PROMETHEUS_TARGETS_ENV)
    return Path(folder) if folder else None


def work_dir_from_env() -> Path:
    return Path(os.environ.get("KILN_WORK_DIR") or DEFAULT_WORK_DIR)


def model_cache_dir() -> Path:
    """Hugging Face models downloaded by `kiln download`, in huggingface_hub's cache layout
    (`models--org--name/{blobs,refs,snapshots}`): `KILN_MODEL_CACHE`, else `model_cache/` in the
    work folder."""
    return Path(os.environ.get("KILN_MODEL_CACHE") or work_dir_from_env() / "model_cache")


@dataclass(frozen=True)
class BaseModelFiles:
    """The files of one base_model run folder (the stage's, or any `kiln pretrain --output`)."""

    folder: Path

    @property
    def model(self) -> Path:
        """The saved HF checkpoint (AutoModelForCausalLM.from_pretrained)."""
        return Path(self.folder) / "model"

    @property
    def tokens(self) -> Path:
        """The packed token files and their stats."""
        return Path(self.folder) / "tokens"

    def token_file(self, split: str) -> Path:
        """train.bin or validation.bin: every document of the split as <|bos|> text <|eos|>, uint16."""
        return self.tokens / f"{split}.bin"

    @property
    def token_stats(self) -> Path:
        """Tokens per split, the tokenizer they were packed with and the unigram baseline."""
        return self.tokens / "stats.json"

    @property
    def profile(self) -> Path:
        """The profile the run trains with, written for `python -m pipeline.train.launch` under torchrun."""
        return Path(self.folder) / "profile.yaml"

    @property
    def checkpoint(self) -> Path:
        """The resumable state: weights, optimizer, schedule, step, random generators."""
        return Path(self.folder) / "checkpoints" / "latest.pt"

    @property
    def summary(self) -> Path:
        """Parameters, validation loss and bits per byte, the unigram baseline, tokens/s."""
        return Path(self.folder) / "summary.json"

    @property
    def metrics(self) -> Path:
        """Pretraining's per-step history and evaluations."""
        return Path(self.folder) / "metrics.json"


@dataclass(frozen=True)
class Layout:
    """The artifact tree of one profile under one work folder."""

    work_dir: Path
    profile: str

    @classmethod
    def for_profile(cls, profile: str, work_dir: str | Path | None = None) -> Layout:
        return cls(Path(work_dir) if work_dir else work_dir_from_env(), profile)

    @property
    def root(self) -> Path:
        return Path(self.work_dir) / self.profile

    @property
    def hash_cache(self) -> Path:
        """sha256 of the stages' input files, by size and modification time."""
        return self.root / ".hashes.json"

    @property
    def timings(self) -> Path:
        """One JSON line per stage and run: seconds, reused or computed."""
        return self.root / "timings.jsonl"

    def stage(self, name: str) -> Path:
        """The folder of one asset, created on first use."""
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # data
    @property
    def raw_corpus(self) -> Path:
        return self.stage("raw_corpus") / "raw.jsonl"

    @property
    def clean_dir(self) -> Path:
        """clean_corpus's output: clean/, rejected/, logs/, stats.json."""
        return self.stage("clean_corpus")

    @property
    def clean_splits(self) -> Path:
        """The train and validation JSONL shards."""
        return self.clean_dir / "clean"

    @property
    def clean_stats(self) -> Path:
        """Documents in, kept, dropped by reason, PII masked, per split."""
        return self.clean_dir / "stats.json"

    # training
    @property
    def tokenizer_dir(self) -> Path:
        return self.stage("tokenizer")

    @property
    def tokenizer(self) -> Path:
        """The transformers tokenizer folder (AutoTokenizer.from_pretrained)."""
        return self.tokenizer_dir / "tokenizer"

    @property
    def tokenizer_stats(self) -> Path:
        """Vocabulary size, bytes per token, round-trip failures."""
        return self.tokenizer_dir / "stats.json"

    def stage_of(self, kind: str) -> Path:
        """base_model, sft_model or dpo_model's folder, by kind: base, sft, dpo."""
        return self.stage(f"{kind}_model")

    def model_dir(self, kind: str) -> Path:
        """The saved HF checkpoint of base, sft or dpo (AutoModelForCausalLM.from_pretrained)."""
        return self.stage_of(kind) / "model"

    def adapter_dir(self, kind: str) -> Path:
        """The LoRA adapter of sft or dpo, before it was merged."""
        return self.stage_of(kind) / "adapter"

    @property
    def base_files(self) -> BaseModelFiles:
        """base_model's run folder: model, token files, checkpoints, profile, summary, metrics."""
        return BaseModelFiles(self.stage_of("base"))

    @property
    def base_summary(self) -> Path:
        """Parameters, validation loss and bits per byte, the unigram baseline, tokens/s."""
        return self.base_files.summary

    @property
    def base_metrics(self) -> Path:
        """Pretraining's per-step history and evaluations."""
        return self.base_files.metrics

    def post_data(self, kind: str) -> Path:
        """sft_data or dpo_data."""
        return self.stage(f"{kind}_data")

    @property
    def feedback_pairs(self) -> Path:
        """Preference pairs from users' judgements of served answers (pairs.jsonl, stats.json)."""
        return self.stage("feedback_pairs")

    # release
    @property
    def gguf_dir(self) -> Path:
        return self.stage("gguf_model")

    @property
    def gguf_name(self) -> str:
        return f"kiln-{self.profile}"

    def gguf(self, quant: str) -> Path:
        return self.gguf_dir / f"{self.gguf_name}-{quant}.gguf"

    @property
    def gguf_files(self) -> Path:
        """files.json: quant -> path of each GGUF file gguf_model wrote."""
        return self.gguf_dir / "files.json"

    @property
    def benchmark_dir(self) -> Path:
        return self.stage("gguf_benchmark")

    @property
    def benchmark_json(self) -> Path:
        return self.benchmark_dir / "benchmark.json"

    @property
    def eval_dir(self) -> Path:
        return self.stage("eval_report")

    @property
    def eval_report(self) -> Path:
        return self.eval_dir / "report.json"

    @property
    def eval_markdown(self) -> Path:
        """report.json's table as Markdown (the model card includes it)."""
        return self.eval_dir / "report.md"

    @property
    def humaneval_samples(self) -> Path:
        """Each model's HumanEval completions and their results."""
        return self.eval_dir / "humaneval"

    @property
    def lm_eval_tasks(self) -> Path:
        """kiln's lm-eval task files, written from held-out code."""
        return self.eval_dir / "lm_eval_tasks"

    @property
    def tuning_dir(self) -> Path:
        """sampling_preset's folder: the presets, the study's summary and its default storage."""
        return self.stage("sampling_preset")

    @property
    def presets_json(self) -> Path:
        """The version's presets (the tuned `code` and the hand-written ones), as the gateway reads them."""
        return self.tuning_dir / "presets.json"

    @property
    def study_json(self) -> Path:
        """Every trial of the study, the best one and the parameter importances."""
        return self.tuning_dir / "study.json"

    @property
    def study_storage(self) -> str:
        """The default Optuna storage: sqlite beside the presets (tune.storage names another)."""
        return f"sqlite:///{self.tuning_dir / 'study.db'}"

    @property
    def bundle_dir(self) -> Path:
        return self.stage("registered_model") / "bundle"
