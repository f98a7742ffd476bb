import os
import random
from pathlib import Path

import pytest

# Nothing in the tests may reach the Hugging Face hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

_WORDS = [
    "the",
    "model",
    "reads",
    "tokens",
    "and",
    "predicts",
    "the",
    "next",
    "one",
    "while",
    "the",
    "optimizer",
    "lowers",
    "the",
    "loss",
    "step",
    "by",
    "step",
    "data",
    "flows",
    "from",
    "raw",
    "files",
    "through",
    "cleaning",
    "into",
    "a",
    "tokenizer",
    "and",
    "then",
    "into",
    "training",
    "and",
    "evaluation",
    "데이터",
    "는",
    "정제",
    "되어",
    "토크나이저",
    "로",
    "들어가고",
    "모델",
    "은",
    "다음",
    "토큰",
    "을",
    "예측",
    "합니다",
]


def _code(rng: random.Random, i: int) -> str:
    name = f"func_{i}_{rng.randrange(1000)}"
    body = "\n".join(f"    x{j} = x{j - 1} * {rng.randrange(1, 9)} + {rng.randrange(100)}" for j in range(1, 6))
    return f'def {name}(x0):\n    """Compute step {i} of the pipeline."""\n{body}\n    return x5\n'


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A clean-corpus folder (clean/train-*.jsonl, clean/validation-*.jsonl) of mixed code and prose,
    big enough to train a small BPE and a few steps of a test-sized model."""
    import json

    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("corpus") / "clean"
    folder.mkdir()
    for split, n in (("train", 300), ("validation", 30)):
        with open(folder / f"{split}-00000.jsonl", "w", encoding="utf-8") as fh:
            for i in range(n):
                if i % 2:
                    text, lang = _code(rng, i), "python"
                else:
                    text, lang = " ".join(rng.choice(_WORDS) for _ in range(120)) + " 🚀", "en"
                fh.write(json.dumps({"id": f"{split}{i}", "text": text, "lang": lang, "split": split}) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_base(small_corpus, tmp_path_factory) -> Path:
    """A test-sized pretrained checkpoint (one layer, 600-token vocabulary, a 256-token context) with its tokenizer."""
    from pipeline.config import ModelShape, PretrainSettings
    from pipeline.data.clean import read_split
    from pipeline.train.pretrain import pretrain, tokenize_to_file
    from pipeline.train.tokenizer import texts_of, token_byte_lengths, train_tokenizer

    root = tmp_path_factory.mktemp("base")
    tok = train_tokenizer(texts_of(read_split(small_corpus, "train")), root / "tok", vocab_size=600, min_frequency=1)
    for split in ("train", "validation"):
        tokenize_to_file(texts_of(read_split(small_corpus, split)), tok, root / f"{split}.bin")
    shape = ModelShape(hidden_size=256, intermediate_size=256, num_layers=1, num_heads=4, num_kv_heads=2)
    # trained at 256 positions, the context it declares: room for SFT/DPO rows and HumanEval prompts
    settings = PretrainSettings(seq_len=256, micro_batch=1, steps=20, warmup_steps=2, eval_every=20, eval_batches=1)
    pretrain(
        root / "train.bin", root / "validation.bin", tok, token_byte_lengths(tok), root, shape, settings, progress=False
    )
    return root / "model"


@pytest.fixture(scope="session")
def ggufs(tiny_base, tmp_path_factory) -> dict:
    """tiny_base as GGUF: {"F16": path, "Q8_0": path, "Q4_K_M": path}."""
    from pipeline.release.gguf_export import export_all

    return export_all(tiny_base, tmp_path_factory.mktemp("gguf"), "test")
