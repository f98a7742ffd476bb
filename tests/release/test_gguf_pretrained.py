"""GGUF export of Llama-family checkpoints that kiln did not train: byte-level BPE with SmolLM's
pre-tokenizer and SentencePiece BPE with byte fallback, tied and untied output weights, grouped-
query attention, linear and Llama 3 RoPE scaling. The gate is the one gguf_benchmark applies:
llama.cpp tokenizes as transformers does, and perplexity agrees (F16 within 1%, Q8_0 within 3%)."""

import json
import shutil

import pytest
from hub_models import byte_level_tokenizer, sample_texts, sentencepiece_tokenizer, tiny_llama, train_briefly

from pipeline.errors import KilnError
from pipeline.release.gguf_bench import PARITY_LIMITS, gguf_perplexity, hf_perplexity, load, tokenization_mismatches
from pipeline.release.gguf_export import byte_level_pre, convert_to_gguf, export_all
from pipeline.train.tokenizer import ROUND_TRIP_SAMPLES

TEXTS = sample_texts(200)
HELD_OUT = sample_texts(20, seed=5) + ROUND_TRIP_SAMPLES + ["digits 1234567 and  two spaces", "\n\nblank lines first"]
# transformers' Llama tokenizer (Metaspace, prepend "first") adds no "▁" to a text that already
# starts with a space, where SentencePiece and llama.cpp add one: the one known difference.
LEADING_SPACE = " a leading space"
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # fmt: skip
CASES = {
    "byte_level_untied": ("byte_level", False, None),
    "sentencepiece_tied": ("sentencepiece", True, None),
    "byte_level_linear_rope": ("byte_level", True, {"rope_type": "linear", "factor": 2.0}),
    "sentencepiece_llama3_rope": ("sentencepiece", False, LLAMA3),
}


def build_checkpoint(folder, kind: str, tie: bool, rope_scaling):
    tok = byte_level_tokenizer(TEXTS) if kind == "byte_level" else sentencepiece_tokenizer(TEXTS, folder / "sp")
    model = tiny_llama(tok, tie=tie, rope_scaling=rope_scaling)
    train_briefly(model, tok, TEXTS, steps=20)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return folder / "model", tok


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    checkpoint, tok = build_checkpoint(folder, *CASES[request.param])
    return request.param, checkpoint, tok, export_all(checkpoint, folder / "gguf", "m")


def eval_ids(tok) -> list[int]:
    ids = []
    for text in sample_texts(20, seed=5):
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids[:512]


def test_parity_with_transformers(exported):
    name, checkpoint, tok, files = exported
    ids = eval_ids(tok)
    hf = hf_perplexity(checkpoint, ids, 128)
    texts = HELD_OUT if name.startswith("sentencepiece") else [*HELD_OUT, LEADING_SPACE]
    for kind, path in files.items():
        llm = load(path, logits_all=True)
        try:
            assert tokenization_mismatches(llm, tok, texts) == [], (name, kind)
            rel = abs(gguf_perplexity(llm, ids, 128) - hf) / hf
        finally:
            llm.close()
        assert rel <= PARITY_LIMITS.get(kind, 0.05), (name, kind, rel)


def test_the_untied_output_and_rope_scaling_reach_the_file(exported):
    from gguf import GGUFReader

    name, checkpoint, _, files = exported
    reader = GGUFReader(str(files["F16"]))
    tensors = {t.name for t in reader.tensors}
    cfg = json.loads((checkpoint / "config.json").read_text())
    assert ("output.weight" in tensors) == (not cfg["tie_word_embeddings"])
    assert ("rope_freqs.weight" in tensors) == name.endswith("llama3_rope")
    assert ("llama.rope.scaling.factor" in reader.fields) == name.endswith("linear_rope")
    model = "llama" if name.startswith("sentencepiece") else "gpt2"
    field = reader.fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == model


@pytest.mark.parametrize("name", ["byte_level_linear_rope", "sentencepiece_llama3_rope"])
def test_rope_scaling_changes_what_the_model_computes(name, tmp_path):
    """Without this, parity on a scaled model would prove nothing: the scaling must matter."""
    checkpoint, tok = build_checkpoint(tmp_path, *CASES[name])
    ids = eval_ids(tok)
    scaled = hf_perplexity(checkpoint, ids, 128)
    cfg = json.loads((checkpoint / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(cfg.get(key), dict):
            cfg[key] = {"rope_type": "default", "rope_theta": cfg[key].get("rope_theta", 10_000.0)}
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    assert abs(hf_perplexity(checkpoint, ids, 128) - scaled) / scaled > 0.01


def test_other_architectures_and_tokenizers_are_refused_by_name(tmp_path):
    checkpoint, tok = build_checkpoint(tmp_path, "byte_level", True, None)
    cfg = json.loads((checkpoint / "config.json").read_text())

    def refused(config: dict, out: str) -> str:
        (checkpoint / "config.json").write_text(json.dumps(config))
        with pytest.raises(KilnError) as err:
            convert_to_gguf(checkpoint, tmp_path / out)
        assert not list(tmp_path.glob(f"*{out}*"))  # nothing half-written
        return str(err.value)

    assert "unsupported architecture GPT2LMHeadModel" in refused(
        {**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "a.gguf"
    )
    assert "unsupported RoPE scaling 'yarn'" in refused({**cfg, "rope_scaling": {"rope_type": "yarn"}}, "b.gguf")
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    spec = json.loads((checkpoint / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Punctuation"}, spec["pre_tokenizer"]]}
    (checkpoint / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(KilnError, match="unsupported byte-level pre-tokenizer Punctuation"):
        convert_to_gguf(checkpoint, tmp_path / "c.gguf")


def test_a_unigram_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    checkpoint, _ = build_checkpoint(tmp_path, "byte_level", True, None)
    uni = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0))
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / f).unlink()
    PreTrainedTokenizerFast(tokenizer_object=uni, unk_token="<unk>", eos_token="<unk>").save_pretrained(checkpoint)
    with pytest.raises(KilnError, match="unsupported tokenizer SentencePiece Unigram"):
        convert_to_gguf(checkpoint, tmp_path / "u.gguf")
    shutil.rmtree(checkpoint)


def test_pre_tokenizer_names():
    gpt2 = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    smollm = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, gpt2["pre_tokenizer"]]}}  # fmt: skip
    assert byte_level_pre(gpt2, "t") == "gpt-2"
    assert byte_level_pre(smollm, "t") == "smollm"
    with pytest.raises(KilnError, match="prefix space"):
        byte_level_pre({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}}, "t")
