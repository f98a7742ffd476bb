"""tokenizer and base_model from a downloaded model, without Dagster: what kiln adds to a base
model's tokenizer, how bytes are counted for each tokenizer kind, and the refusals."""

import json

import pytest
from hub_models import byte_level_tokenizer, sample_texts, sentencepiece_tokenizer, tiny_llama, train_briefly

from pipeline.errors import KilnError
from pipeline.train.pretrained import pretrained_base, pretrained_tokenizer
from pipeline.train.tokenizer import (
    BYTE_LEVEL_BPE,
    ROUND_TRIP_SAMPLES,
    SENTENCEPIECE_BPE,
    token_byte_lengths,
    tokenizer_kind,
)

TEXTS = sample_texts(200)
VALIDATION = [{"text": t, "lang": "python" if t.startswith("def") else "en"} for t in sample_texts(20, seed=3)]


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp")
    tok = sentencepiece_tokenizer(TEXTS, folder / "spm")
    model = tiny_llama(tok, tie=True)
    train_briefly(model, tok, TEXTS, steps=30)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return folder / "model", tok


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_token_bytes_add_up_to_the_text(kind, tmp_path):
    tok = byte_level_tokenizer(TEXTS) if kind == "byte_level" else sentencepiece_tokenizer(TEXTS, tmp_path)
    assert tokenizer_kind(json.loads(tok.backend_tokenizer.to_str())) == (
        BYTE_LEVEL_BPE if kind == "byte_level" else SENTENCEPIECE_BPE
    )
    lengths = token_byte_lengths(tok)
    for text in ROUND_TRIP_SAMPLES[:5]:  # code, whitespace, English, Korean (byte fallback), emoji
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prefix = 1 if kind == "sentencepiece" else 0  # the "▁" SentencePiece puts before a text
        assert sum(lengths[i] for i in ids) == len(text.encode("utf-8")) + prefix, text


def test_the_tokenizer_stage_keeps_the_models_tokenizer_and_adds_what_is_missing(sentencepiece_model, tmp_path):
    from transformers import AutoTokenizer

    folder, tok = sentencepiece_model
    stats = pretrained_tokenizer(str(folder), None, tmp_path, VALIDATION)
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert stats["from_pretrained"] == str(folder)
    assert stats["vocab_size"] == len(tok)
    assert stats["round_trip_failures"] == []
    assert stats["round_trip_texts"] == len(VALIDATION) + 6
    assert saved.get_vocab() == tok.get_vocab()
    assert saved.pad_token == "</s>"
    assert tok.pad_token is None
    chat = saved.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    assert json.loads((tmp_path / "stats.json").read_text()) == stats


def test_the_base_model_stage_saves_and_measures_it(sentencepiece_model, tmp_path):
    folder, _ = sentencepiece_model
    pretrained_tokenizer(str(folder), None, tmp_path / "tok", VALIDATION)
    texts = [r["text"] for r in VALIDATION]
    summary = pretrained_base(str(folder), None, tmp_path / "tok" / "tokenizer", tmp_path / "base", TEXTS, texts, 64)
    assert (tmp_path / "base" / "model" / "model.safetensors").is_file()
    assert summary["val_bpb"] < summary["unigram_bpb"] < 8
    assert json.loads((tmp_path / "base" / "summary.json").read_text()) == summary


def test_a_tokenizer_without_eos_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(tmp_path)
    LlamaForCausalLM(LlamaConfig(vocab_size=2, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(KilnError, match="no end-of-sequence token"):
        pretrained_tokenizer(str(tmp_path), None, tmp_path / "out", VALIDATION)
    assert not (tmp_path / "out" / "tokenizer").exists()


def test_a_missing_folder_or_model_is_one_line(tmp_path):
    with pytest.raises(KilnError, match="no such model folder"):
        pretrained_tokenizer(str(tmp_path / "nowhere"), None, tmp_path / "out", VALIDATION)
    with pytest.raises(KilnError, match="not a model id"):
        pretrained_tokenizer("not a model id!", None, tmp_path / "out", VALIDATION)
