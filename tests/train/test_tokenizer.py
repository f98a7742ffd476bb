"""The byte-level BPE: size, special tokens, chat template, lossless round trip, loading."""

import pytest
from transformers import AutoTokenizer

from pipeline.data.clean import read_split
from pipeline.errors import KilnError
from pipeline.train.tokenizer import (
    ROUND_TRIP_SAMPLES,
    SPECIAL_TOKENS,
    bytes_per_token,
    measure_tokenizer,
    round_trip_failures,
    texts_of,
    token_byte_lengths,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tok(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(texts_of(read_split(small_corpus, "train")), out, vocab_size=600, min_frequency=1), out


def test_vocab_size_and_special_tokens(tok):
    tokenizer, folder = tok
    reloaded = AutoTokenizer.from_pretrained(str(folder))
    assert len(reloaded) == 600
    assert reloaded.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    # special tokens are single ids, not split into pieces
    assert reloaded.encode("<|fim_prefix|>a<|fim_suffix|>", add_special_tokens=False)[0] == SPECIAL_TOKENS.index(
        "<|fim_prefix|>"
    )


def test_round_trip_is_lossless(tok, small_corpus):
    tokenizer, _ = tok
    held_out = [r["text"] for r in read_split(small_corpus, "validation")]
    assert round_trip_failures(tokenizer, held_out + ROUND_TRIP_SAMPLES) == []
    # bytes the BPE never saw (other scripts, control bytes) still round-trip: byte-level fallback
    assert round_trip_failures(tokenizer, ["Ελληνικά ☃ \x00\x07 ﷺ"]) == []


def test_chat_template(tok):
    tokenizer, _ = tok
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tokenize=False
    )
    assert text == "<|bos|><|user|>\nhi<|end|>\n<|assistant|>\nhello<|end|>\n"
    user = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")


def test_token_byte_lengths_sum_to_text_bytes(tok):
    tokenizer, _ = tok
    lengths = token_byte_lengths(tokenizer)
    assert all(lengths[i] == 0 for i in range(len(SPECIAL_TOKENS)))  # specials stand for no text bytes
    plain = "plain text without specials: 한국어 🚀"
    assert sum(lengths[i] for i in tokenizer.encode(plain, add_special_tokens=False)) == len(plain.encode())
    assert bytes_per_token(tokenizer, [plain]) > 1.0


def test_too_little_text_is_a_clear_error(tmp_path):
    with pytest.raises(KilnError, match="supports only .* tokens, not tokenizer.vocab_size=32000"):
        train_tokenizer(["tiny text"], tmp_path / "t", vocab_size=32_000)
    assert not (tmp_path / "t").exists()


def test_bytes_per_token_on_korean_beside_code_and_english(tok, small_corpus, tmp_path):
    from pipeline.data.ingest import Source, read_source

    korean = list(read_source(Source(builtin="korean_prose")))
    held_out, train = korean[::4], [r for i, r in enumerate(korean) if i % 4]
    mixed = [r["text"] for r in read_split(small_corpus, "train")] + [r["text"] for r in train]
    trained = train_tokenizer(mixed, tmp_path / "ko", vocab_size=2000, min_frequency=1)
    val = list(read_split(small_corpus, "validation")) + held_out
    bpt = measure_tokenizer(trained, val)["bytes_per_token"]
    groups = {"code": "python", "english": "en", "korean": "ko"}
    for name, lang in groups.items():
        assert bpt[name] == bytes_per_token(trained, [r["text"] for r in val if r["lang"] == lang])
    # Trained with Korean, a token holds more than one Hangul syllable's 3 bytes on held-out
    # chapters and bills; the tokenizer trained without Korean falls back to bytes and pairs.
    assert bpt["korean"] > 3.0
    without = measure_tokenizer(tok[0], val)["bytes_per_token"]["korean"]
    assert without < 2.0 < bpt["korean"]
    assert measure_tokenizer(trained, list(read_split(small_corpus, "validation")))["bytes_per_token"]["korean"] is None
