"""Scoring a saved checkpoint on text: bits per byte, as base_model reports a pretrained model's
and eval_report scores every model's. In the train layer so that both may call it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.train.tokenizer import bits_per_byte as text_bits_per_byte
from pipeline.train.tokenizer import document_stream, text_nats_and_bytes, token_byte_lengths


@torch.no_grad()
def bits_per_byte(checkpoint: Path, texts: list[str], batch_size: int = 8, window: int = 512) -> dict:
    """Bits per UTF-8 byte of `texts` under the model, in the layout it was trained on: each text
    as <|bos|> text <|eos|> (after <|eos|> alone for a tokenizer without its own bos), scored in
    consecutive windows of `window` tokens (the training sequence length: positions past it were
    never trained). Scored as base_model's `val_bpb` is, by `text_nats_and_bytes`: the <|eos|>
    and <|bos|> separators are context, not text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).to(device).eval()
    window = min(window, model.config.max_position_embeddings)
    eos = tok.eos_token_id
    token_bytes = torch.tensor(token_byte_lengths(tok), dtype=torch.float64)
    stream = list(document_stream(tok, tok(texts, add_special_tokens=False)["input_ids"]))
    pad = -(len(stream) - 1) % window  # padding is <|eos|>: 0 bytes, so never scored
    x = torch.nn.functional.pad(torch.tensor(stream[:-1]), (0, pad), value=eos).view(-1, window)
    y = torch.nn.functional.pad(torch.tensor(stream[1:]), (0, pad), value=eos).view(-1, window)
    nats = n_bytes = 0.0
    for i in range(0, len(x), batch_size):
        logits = model(input_ids=x[i : i + batch_size].to(model.device)).logits.float()
        target = y[i : i + batch_size].flatten()
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.to(model.device), reduction="none")
        batch_nats, batch_bytes = text_nats_and_bytes(losses.cpu(), target, token_bytes)
        nats, n_bytes = nats + batch_nats, n_bytes + batch_bytes
    return {"bits_per_byte": text_bits_per_byte(nats, n_bytes), "bytes": int(n_bytes)}
