"""Test-sized Llama models as they come from the Hugging Face hub, built here and saved in
huggingface_hub's cache layout (`models--org--name/{blobs,refs,snapshots}`), so kiln's model
cache is tested offline: a byte-level BPE tokenizer with SmolLM's pre-tokenizer (digits split
one by one, then GPT-2's regex), and a SentencePiece BPE tokenizer trained by sentencepiece with
byte fallback, as Llama 2 and Mistral ship."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

import torch

WORDS = [
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
]
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a snapshot's commit hash (40 hex digits)
LICENSE_CARD = "---\nlicense: apache-2.0\nlanguage: [en]\n---\n# a test model\n"


def sample_texts(n: int, seed: int = 0) -> list[str]:
    """Prose with numbers and small Python functions: what the tokenizers and models learn."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        if i % 2:
            body = "\n".join(f"    x{j} = x{j - 1} * {rng.randrange(2, 9)} + {rng.randrange(99)}" for j in range(1, 5))
            texts.append(f'def f{i}(x0):\n    """Step {i} of the run."""\n{body}\n    return x4\n')
        else:
            texts.append(" ".join(rng.choice(WORDS) + (str(rng.randrange(300)) if rng.random() < 0.1 else "")
                                  for _ in range(60)) + ".")  # fmt: skip
    return texts


def byte_level_tokenizer(texts: list[str], vocab_size: int = 400):
    """SmolLM's kind: byte-level BPE, digits split first, <|endoftext|> as bos, eos and unk, no pad
    token and no chat template (a base model's tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[0], eos_token=specials[0], unk_token=specials[0],
        additional_special_tokens=specials[1:], clean_up_tokenization_spaces=False,
    )  # fmt: skip


def sentencepiece_tokenizer(texts: list[str], folder: Path, vocab_size: int = 500):
    """Llama 2's kind: a SentencePiece BPE model (identity normalization, byte fallback, digits
    split) trained by sentencepiece, as transformers' Llama tokenizer: the pieces in id order and
    the merges that rebuild them (what transformers' own conversion does, read here through
    sentencepiece's API rather than its protobuf file)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(folder / "sp"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    return LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), legacy=True)


def tiny_llama(tok, tie: bool, rope_scaling: dict | None = None, seed: int = 0):
    """One Llama block with grouped-query attention (4 heads, 2 key/value heads); hidden and MLP
    widths of 256, which llama.cpp's K-quants need."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie, rope_scaling=rope_scaling,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train_briefly(model, tok, texts: list[str], steps: int = 40, seq: int = 64, batch: int = 8) -> None:
    """A few AdamW steps on `texts`, so the model predicts better than a unigram model does."""
    ids = []
    for row in tok(texts, add_special_tokens=False)["input_ids"]:
        ids += [tok.eos_token_id, *row]
    data = torch.tensor(ids)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def save_in_hub_cache(model, tok, cache: Path, repo_id: str, commit: str = COMMIT, card: str = LICENSE_CARD,
                      max_shard_size: str | None = None) -> Path:  # fmt: skip
    """The model and tokenizer as huggingface_hub stores a download: files in blobs/ named by
    their sha256, the snapshot folder of links to them, refs/main naming the commit."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    staged = repo / "staged"
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(staged, **kwargs)
    tok.save_pretrained(staged)
    (staged / "README.md").write_text(card)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(staged.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        os.replace(f, repo / "blobs" / digest)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", digest))
    shutil.rmtree(staged)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
