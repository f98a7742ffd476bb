"""tokenizer and base_model from a downloaded model (`model.from_pretrained` in the profile)
instead of training them: the model's own tokenizer, and its weights as the base checkpoint.

Everything after base_model (SFT, DPO, evaluation, GGUF, registry) reads the same folders as for
a model kiln pretrained. Two things a base model's tokenizer often lacks and the later stages
need are added here, in the copy kiln keeps (the cache stays as downloaded): a pad token (the
end-of-sequence token, as is usual for causal models) and a chat template for the SFT and DPO
pairs (kiln's turn format, each turn closed by the model's end-of-sequence token).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import KilnError
from pipeline.io import atomic_path, write_json
from pipeline.layout import BaseModelFiles
from pipeline.train.hub import resolve
from pipeline.train.tokenizer import (
    bits_per_byte,
    measure_tokenizer,
    set_stop_tokens,
    text_nats_and_bytes,
    token_byte_lengths,
)

# kiln's turn format with the model's own end-of-sequence token closing each turn.
PLAIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def load_pretrained_tokenizer(folder: Path, name: str):
    """The model's tokenizer, with a pad token and a chat template where it has none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise KilnError(f"{name}: its tokenizer does not load ({str(exc).splitlines()[0][:200]})") from None
    if tok.eos_token_id is None:
        raise KilnError(f"{name}: its tokenizer has no end-of-sequence token (eos_token), which every stage needs")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


def pretrained_tokenizer(ref: str, revision: str | None, out_dir: Path, validation: list[dict]) -> dict:
    """The tokenizer stage for `ref`: its tokenizer saved to `out_dir/tokenizer/`, measured on the
    validation records like a trained one; writes and returns `out_dir/stats.json`."""
    folder = resolve(ref, revision)
    tok = load_pretrained_tokenizer(folder, ref)
    with atomic_path(Path(out_dir) / "tokenizer") as tmp:
        tok.save_pretrained(tmp)
    stats = {**measure_tokenizer(tok, validation), "from_pretrained": ref, "snapshot": str(folder)}
    write_json(Path(out_dir) / "stats.json", stats)
    return stats


def pretrained_base(
    ref: str, revision: str | None, tokenizer_dir: Path, out_dir: Path, train: list[str], validation: list[str],
    window: int,
) -> dict:  # fmt: skip
    """The base_model stage for `ref`: its weights and kiln's copy of its tokenizer saved as
    the run folder's model (`BaseModelFiles`, safetensors), then measured as a pretrained model is:
    validation bits per byte in windows of `window` tokens against a unigram model of the train
    split. Writes its summary and an empty metrics file (no training history)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.train.scoring import bits_per_byte as model_bits_per_byte

    folder = resolve(ref, revision)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise KilnError(f"{ref}: not a causal language model transformers can load ({str(exc)[:200]})") from None
    if model.get_input_embeddings().num_embeddings < len(tok):
        raise KilnError(f"{ref}: the tokenizer has {len(tok)} tokens but the model only {model.config.vocab_size}")
    set_stop_tokens(model, tok)
    files = BaseModelFiles(Path(out_dir))
    model_dir = files.model
    with atomic_path(model_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    val = model_bits_per_byte(model_dir, validation, window=window)
    summary = {
        "from_pretrained": ref,
        "snapshot": str(folder),
        "parameters": parameters,
        "steps": 0,
        "val_bpb": val["bits_per_byte"],
        "val_bytes": val["bytes"],
        "unigram_bpb": unigram_bpb(tok, train, validation),
    }
    write_json(files.summary, summary)
    write_json(files.metrics, {"history": [], "evals": []})
    return summary


def unigram_bpb(tok, train: list[str], validation: list[str]) -> float:
    """Bits per byte of an add-one smoothed unigram model of the train texts on the validation
    texts, each after an end-of-sequence token as bits_per_byte scores them: the floor the model
    must beat (the same measure pretraining's baseline is)."""

    def ids(texts):
        out = []
        for row in tok(list(texts), add_special_tokens=False)["input_ids"]:
            out += [*row, tok.eos_token_id]
        return np.asarray(out, dtype=np.int64)

    counts = np.bincount(ids(train), minlength=len(tok)) + 1.0
    logp = np.log(counts / counts.sum())
    val = ids(validation)
    return bits_per_byte(*text_nats_and_bytes(-logp[val], val, np.asarray(token_byte_lengths(tok))))
