"""tokenizer: a 32,000-token byte-level BPE trained on the clean train split.

Pre-tokenization is GPT-2's byte-level scheme (its regex, no prefix space, no normalizer), so
any byte sequence round-trips and llama.cpp's `gpt-2` pre-tokenizer splits text exactly as HF
does. Special tokens: <|bos|>, <|eos|>, <|pad|>, chat roles (<|system|>, <|user|>,
<|assistant|>, and <|end|> closing a turn) and fill-in-the-middle (<|fim_prefix|>,
<|fim_middle|>, <|fim_suffix|>). The chat template, in tokenizer_config.json, is the one the
SFT and DPO stages and the GGUF use.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.errors import KilnError
from pipeline.io import atomic_path

BOS, EOS, PAD, END = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
FIM = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")
SPECIAL_TOKENS = [BOS, EOS, PAD, END, *ROLES, *FIM]

# <|role|>\ncontent<|end|>\n per message; a generation prompt opens the assistant's turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Text the round-trip check always covers, whatever the corpus: code, English, Korean, emoji.
ROUND_TRIP_SAMPLES = [
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "\tindented\twith tabs,   runs of  spaces\r\nand CRLF line ends\n\n\n",
    "The quick brown fox jumps over the lazy dog. It's 3.11.7, isn't it?",
    "한국어 문장도 손실 없이 복원되어야 합니다. 가나다라마바사!",
    "Emoji and symbols: 🚀🔥👩‍💻 ∑ ≠ ∞ — “quotes” «guillemets» 日本語 中文",
    "<|user|>special tokens inside text<|end|> and <|fim_prefix|> stay text-splittable",
]


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 32_000, min_frequency: int = 2):
    """Train the byte-level BPE on `texts` and save a transformers tokenizer folder at `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise KilnError(f"tokenizer.vocab_size {vocab_size} is below the 256 bytes plus special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,  # ids 0..9, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    got = tok.get_vocab_size()
    if got != vocab_size:
        raise KilnError(
            f"the training text supports only {got} tokens, not tokenizer.vocab_size={vocab_size}: "
            "add text (corpus.max_bytes) or lower tokenizer.min_frequency"
        )
    save_tokenizer(tok, out_dir)
    return load_tokenizer(out_dir)


def save_tokenizer(tok, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[END, *ROLES, *FIM],
        clean_up_tokenization_spaces=False,  # the cleanup would change spaces before punctuation
        model_max_length=1_000_000,
    )
    hf.chat_template = CHAT_TEMPLATE
    with atomic_path(Path(out_dir)) as tmp:
        hf.save_pretrained(tmp)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise KilnError(f"{folder}: no tokenizer.json (materialize the tokenizer asset first)")
    return AutoTokenizer.from_pretrained(str(folder))


def document_start_ids(tokenizer) -> list[int]:
    """What opens every document in pretraining: <|bos|>, as every chat sequence opens, so the
    model has seen it before SFT. None for a tokenizer whose bos is missing or is its eos (its
    documents are told apart by the eos between them)."""
    bos = tokenizer.bos_token_id
    return [] if bos is None or bos == tokenizer.eos_token_id else [bos]


def document_stream(tokenizer, encoded: Iterable[list[int]]) -> Iterator[int]:
    """Encoded texts laid out as pretraining packs them, each as <|bos|> text <|eos|>, for scoring:
    without a bos of its own, an <|eos|> first, so the first text's first token has one before it."""
    start, eos = document_start_ids(tokenizer), tokenizer.eos_token_id
    if not start:
        yield eos
    for ids in encoded:
        yield from (*start, *ids, eos)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a generation: end-of-sequence and <|end|>, which closes a chat turn (the GGUF's
    end-of-turn token), where the vocabulary has it."""
    end = tokenizer.get_vocab().get(END)
    return [i for i in dict.fromkeys([tokenizer.eos_token_id, end]) if i is not None]


def set_stop_tokens(model, tokenizer) -> None:
    """The model's generation_config stops at `stop_token_ids` (and at any eos it already had), so
    HF generation ends a chat turn where llama.cpp does."""
    config = model.generation_config
    own = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    config.eos_token_id = [i for i in dict.fromkeys([*stop_token_ids(tokenizer), *own]) if i is not None]
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id


def chat_token_ids(tokenizer) -> list[int]:
    """The special tokens the chat template writes around messages (kiln's: <|bos|>, the roles and
    <|end|>; a downloaded model's: whichever of its own its template uses)."""
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    texts = [tokenizer.apply_chat_template(turns, add_generation_prompt=False, tokenize=False)]
    try:  # some templates refuse a system turn
        system = [{"role": "system", "content": "s"}, *turns]
        texts.append(tokenizer.apply_chat_template(system, add_generation_prompt=False, tokenize=False))
    except Exception:  # noqa: BLE001 - jinja raises whatever the template author chose
        pass
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    used = {i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]}
    return sorted(used & special)


def round_trip_failures(tokenizer, texts: Iterable[str]) -> list[str]:
    """Texts that do not come back byte for byte from encode then decode (first 80 chars each)."""
    failures = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if tokenizer.decode(ids, skip_special_tokens=False) != text:
            failures.append(text[:80])
    return failures


def bytes_per_token(tokenizer, texts: Iterable[str]) -> float:
    n_bytes = n_tokens = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tokenizer.encode(text, add_special_tokens=False))
    return n_bytes / max(n_tokens, 1)


def token_byte_lengths(tokenizer) -> list[int]:
    """UTF-8 bytes each token id stands for (0 for special tokens): bits per byte needs it.
    Byte-level BPE spells bytes as GPT-2's printable characters; a SentencePiece vocabulary
    spells a space as "▁" and a fallback byte as <0xNN>. SentencePiece also puts a "▁" before
    each text, so its texts count one byte more than they hold (one per document, not per token)."""
    byte_decoder = {ch: b for b, ch in enumerate(_bytes_to_unicode())}
    byte_level = tokenizer_kind(json.loads(tokenizer.backend_tokenizer.to_str())) == BYTE_LEVEL_BPE
    lengths = [0] * len(tokenizer)
    special = set(tokenizer.all_special_ids)
    for token, idx in tokenizer.get_vocab().items():
        if idx in special or token in SPECIAL_TOKENS:
            continue
        if byte_level:
            lengths[idx] = sum(1 for ch in token if ch in byte_decoder)
        else:
            lengths[idx] = 1 if BYTE_PIECE.fullmatch(token) else len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths


BYTE_LEVEL_BPE, SENTENCEPIECE_BPE = "byte-level BPE", "SentencePiece BPE"
SENTENCEPIECE_UNIGRAM = "SentencePiece Unigram"
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def tokenizer_parts(node: dict | None) -> list[dict]:
    """A normalizer, pre-tokenizer or decoder of tokenizer.json with its Sequence unrolled."""
    if not node:
        return []
    inner = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders")
    return [p for child in inner for p in tokenizer_parts(child)] if node.get("type") == "Sequence" else [node]


def tokenizer_kind(spec: dict) -> str:
    """What a tokenizer.json is: byte-level BPE (GPT-2, SmolLM, kiln's own), SentencePiece BPE
    (Llama 2, Mistral: "▁" for spaces, byte fallback), SentencePiece Unigram, or its model type."""
    model = spec.get("model", {}).get("type")
    keys = ("normalizer", "pre_tokenizer", "decoder")
    types = {p.get("type") for key in keys for p in tokenizer_parts(spec.get(key))}
    if model == "BPE" and "ByteLevel" in types:
        return BYTE_LEVEL_BPE
    sentencepiece = "Metaspace" in types or spec["model"].get("byte_fallback") or "Prepend" in types
    if model == "BPE" and sentencepiece:
        return SENTENCEPIECE_BPE
    if model == "Unigram":
        return SENTENCEPIECE_UNIGRAM
    return str(model)


def text_nats_and_bytes(losses, targets, token_bytes) -> tuple[float, float]:
    """Bits per byte's two sums over next-token `losses` (nats) at `targets`, tensors or arrays on
    one device: the nats of targets that stand for text, and their UTF-8 bytes. Targets of 0 bytes
    (<|eos|> and the other special tokens) are context only and not scored: counting them would
    charge loss to no bytes. The one definition for training's validation, the unigram baseline and
    eval_report; bits per byte is `bits_per_byte(*text_nats_and_bytes(...))`."""
    nbytes = token_bytes[targets]
    return float(losses[nbytes > 0].sum()), float(nbytes.sum())


def bits_per_byte(nats: float, n_bytes: float) -> float:
    return nats / math.log(2) / max(n_bytes, 1)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's map from the 256 byte values to printable characters, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


def texts_of(records: Iterable[dict], max_bytes: int | None = None) -> Iterator[str]:
    """The `text` of each record, stopping once `max_bytes` have been yielded."""
    seen = 0
    for rec in records:
        if max_bytes is not None and seen >= max_bytes:
            return
        seen += len(rec["text"].encode("utf-8"))
        yield rec["text"]


def build_tokenizer(clean_dir: Path, out_dir: Path, profile) -> dict:
    """The tokenizer stage: train on the clean train split, measure on the validation split,
    write `out_dir/tokenizer/` and `out_dir/stats.json`; returns the stats."""
    from pipeline.data.clean import read_split  # datatrove: only this stage needs it
    from pipeline.io import write_json

    settings = profile.tokenizer
    tok = train_tokenizer(
        texts_of(read_split(clean_dir, "train"), settings.max_train_bytes),
        out_dir / "tokenizer",
        settings.vocab_size,
        settings.min_frequency,
    )
    stats = measure_tokenizer(tok, list(read_split(clean_dir, "validation")))
    write_json(out_dir / "stats.json", stats)
    return stats


def measure_tokenizer(tok, val: list[dict]) -> dict:
    """Vocabulary size, bytes per token (all, code, prose, and English and Korean prose apart,
    since a Hangul syllable is three UTF-8 bytes and an English letter one) and round-trip
    failures on the validation records and the fixed samples: the tokenizer stage's stats. A
    figure is None when the validation split holds no text of its kind."""
    prose_langs = ("en", "ko", "other", "unknown")
    groups = {
        "code": [r["text"] for r in val if r["lang"] not in prose_langs],
        "prose": [r["text"] for r in val if r["lang"] in prose_langs],
        "english": [r["text"] for r in val if r["lang"] == "en"],
        "korean": [r["text"] for r in val if r["lang"] == "ko"],
    }
    return {
        "vocab_size": len(tok),
        "bytes_per_token": {
            "validation": bytes_per_token(tok, groups["code"] + groups["prose"]),
            **{name: bytes_per_token(tok, texts) if texts else None for name, texts in groups.items()},
        },
        "round_trip_failures": round_trip_failures(tok, [r["text"] for r in val] + ROUND_TRIP_SAMPLES),
        "round_trip_texts": len(val) + len(ROUND_TRIP_SAMPLES),
    }
