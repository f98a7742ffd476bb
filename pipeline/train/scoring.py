"""Scoring a saved checkpoint on text: bits per byte, as base_model reports a pretrained model's
and eval_report scores every model's. In the train layer so that both may call it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pipeline.train.tokenizer import bits_per_byte as text_bits_per_byte
from pipeline.train.tokenizer import document_start_ids, document_stream, text_nats_and_bytes, token_byte_lengths


def _owners(tokenizer, encoded: list[list[int]]) -> list[int]:
    """For each position of `document_stream(tokenizer, encoded)`, the text it belongs to (its
    <|bos|> and <|eos|> too; the leading <|eos|> of a tokenizer without bos: none, -1)."""
    start = document_start_ids(tokenizer)
    owners = [] if start else [-1]
    for d, ids in enumerate(encoded):
        owners += [d] * (len(start) + len(ids) + 1)
    return owners


@torch.no_grad()
def bits_per_byte(checkpoint: Path, texts: list[str], batch_size: int = 8, window: int = 512) -> dict:
    """Bits per UTF-8 byte of `texts` under the model, in the layout it was trained on: each text
    as <|bos|> text <|eos|> (after <|eos|> alone for a tokenizer without its own bos), scored in
    consecutive windows of `window` tokens (the training sequence length: positions past it were
    never trained). Scored as base_model's `val_bpb` is, by `text_nats_and_bytes`: the <|eos|>
    and <|bos|> separators are context, not text. `documents` holds each text's own [bits, bytes]
    (the per-item results a paired comparison and a standard error need)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).to(device).eval()
    window = min(window, model.config.max_position_embeddings)
    eos = tok.eos_token_id
    token_bytes = torch.tensor(token_byte_lengths(tok), dtype=torch.float64)
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    stream = list(document_stream(tok, encoded))
    pad = -(len(stream) - 1) % window  # padding is <|eos|>: 0 bytes, so never scored
    x = torch.nn.functional.pad(torch.tensor(stream[:-1]), (0, pad), value=eos).view(-1, window)
    y = torch.nn.functional.pad(torch.tensor(stream[1:]), (0, pad), value=eos).view(-1, window)
    # The text each target belongs to; the padding and a leading <|eos|> to a bucket past the last.
    owner = torch.tensor(_owners(tok, encoded)[1:], dtype=torch.long)
    owner = torch.where(owner < 0, len(texts), owner)
    owner = torch.nn.functional.pad(owner, (0, pad), value=len(texts)).view(-1, window)
    doc_nats = torch.zeros(len(texts) + 1, dtype=torch.float64)
    doc_bytes = torch.zeros(len(texts) + 1, dtype=torch.float64)
    nats = n_bytes = 0.0
    for i in range(0, len(x), batch_size):
        logits = model(input_ids=x[i : i + batch_size].to(model.device)).logits.float()
        target = y[i : i + batch_size].flatten()
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.to(model.device), reduction="none")
        batch_nats, batch_bytes = text_nats_and_bytes(losses.cpu(), target, token_bytes)
        nats, n_bytes = nats + batch_nats, n_bytes + batch_bytes
        nbytes, who = token_bytes[target], owner[i : i + batch_size].flatten()
        doc_nats.index_add_(0, who, torch.where(nbytes > 0, losses.cpu().double(), 0.0))
        doc_bytes.index_add_(0, who, nbytes)
    documents = [[float(n) / math.log(2), int(b)] for n, b in zip(doc_nats[:-1], doc_bytes[:-1], strict=True)]
    return {"bits_per_byte": text_bits_per_byte(nats, n_bytes), "bytes": int(n_bytes), "documents": documents}


def ratio_stderr(bits: list[float], n_bytes: list[float]) -> float | None:
    """The standard error of bits per byte, sum(bits) / sum(bytes), over documents drawn at random
    (the delta method for a ratio of sums); None with fewer than two documents."""
    pairs = [(b, n) for b, n in zip(bits, n_bytes, strict=True) if n > 0]
    if len(pairs) < 2:
        return None
    total = sum(n for _, n in pairs)
    ratio, mean_bytes = sum(b for b, _ in pairs) / total, total / len(pairs)
    residuals = [b - ratio * n for b, n in pairs]
    variance = sum(r * r for r in residuals) / (len(pairs) - 1)
    return math.sqrt(variance / len(pairs)) / mean_bytes
