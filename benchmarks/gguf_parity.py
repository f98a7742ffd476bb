"""GGUF parity for Llama-family checkpoints kiln did not train: per tokenizer kind and quantization,
how many texts llama.cpp tokenizes exactly as transformers does, and perplexity under each.

    python benchmarks/gguf_parity.py                         # the test-sized models, built here
    python benchmarks/gguf_parity.py --model HuggingFaceTB/SmolLM-135M --model DIR   # cached ids or folders

The test-sized models are the ones tests/hub_models.py builds (one Llama block, GQA, 256 wide),
trained briefly on generated prose and code: a byte-level BPE one (SmolLM's pre-tokenizer,
untied output) and a SentencePiece BPE one (byte fallback, tied). Perplexity is measured in
windows of 128 tokens over held-out text, by the same code gguf_benchmark's gate runs
(`pipeline.release.gguf_bench`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the model builders the tests use


def build_test_models(folder: Path) -> dict[str, Path]:
    from hub_models import byte_level_tokenizer, sample_texts, sentencepiece_tokenizer, tiny_llama, train_briefly

    texts = sample_texts(400)
    out = {}
    for name, tok, tie in (
        ("byte-level BPE, untied", byte_level_tokenizer(texts, 500), False),
        ("SentencePiece BPE, tied", sentencepiece_tokenizer(texts, folder / "sp"), True),
    ):
        model = tiny_llama(tok, tie=tie)
        train_briefly(model, tok, texts, steps=150)
        path = folder / name.split(",")[0].replace(" ", "_")
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
    return out


def measure(checkpoint: Path, folder: Path, texts: list[str]) -> dict:
    from transformers import AutoTokenizer

    from pipeline.release.gguf_bench import gguf_perplexity, hf_perplexity, load, tokenization_mismatches
    from pipeline.release.gguf_export import export_all
    from pipeline.train.tokenizer import ROUND_TRIP_SAMPLES

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    ids = []
    for text in texts:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = ids[:2048]
    hf = hf_perplexity(checkpoint, ids, 128)
    checked = texts + ROUND_TRIP_SAMPLES
    rows = {}
    for quant, path in export_all(checkpoint, folder, "parity").items():
        llm = load(path, logits_all=True)
        try:
            bad = tokenization_mismatches(llm, tok, checked)
            ppl = gguf_perplexity(llm, ids, 128)
        finally:
            llm.close()
        rows[quant] = {"agree": len(checked) - len(bad), "texts": len(checked), "hf_ppl": hf, "gguf_ppl": ppl,
                       "rel_diff": abs(ppl - hf) / hf, "tokens": len(ids)}  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="a cached hub id or a save_pretrained folder")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from hub_models import sample_texts

    from pipeline.train.hub import resolve

    held_out = sample_texts(60, seed=7)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {m: resolve(m) for m in args.model} if args.model else build_test_models(Path(tmp))
        for name, checkpoint in models.items():
            results[name] = measure(checkpoint, Path(tmp) / "gguf" / str(len(results)), held_out)
    print("| model (tokenizer) | GGUF | tokenization agrees | perplexity transformers | llama.cpp | relative diff |")
    print("|---|---|---:|---:|---:|---:|")
    for name, rows in results.items():
        for quant, r in rows.items():
            print(f"| {name} | {quant} | {r['agree']}/{r['texts']} | {r['hf_ppl']:.3f} | {r['gguf_ppl']:.3f} | "
                  f"{r['rel_diff']:.3%} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
