"""gguf_model: convert the final HF checkpoint to GGUF F16, then quantize with llama.cpp.

The converter is written on the `gguf` library's writer and tensor-name map: the model's
hyper-parameters, the whole byte-level BPE tokenizer (tokens, token types, merges, the `gpt2`
model with the `gpt-2` pre-tokenizer, special-token ids, the chat template), then every tensor
under its GGUF name. Q8_0 and Q4_K_M come from llama.cpp's own quantizer
(`llama_model_quantize` through llama-cpp-python). Every file is written under a temporary
name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
from pathlib import Path

import numpy as np

from pipeline.errors import KilnError
from pipeline.io import atomic_path
from pipeline.train.tokenizer import END, SPECIAL_TOKENS

QUANTS = ("Q8_0", "Q4_K_M")


def rotary_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotary layout to llama.cpp's.

    HF applies RoPE to the two halves of each head's dimensions ("rotate_half"); llama.cpp
    rotates adjacent pairs. Per head, rows [0..d/2) and [d/2..d) are interleaved:
    (n_heads, 2, d/2, in) -> (n_heads, d/2, 2, in).
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tokenizer_metadata(writer, checkpoint: Path) -> None:
    import gguf
    from transformers import AutoTokenizer

    tok_file = checkpoint / "tokenizer.json"
    if not tok_file.is_file():
        raise KilnError(f"{checkpoint}: no tokenizer.json beside the weights (a GGUF carries its tokenizer)")
    spec = json.loads(tok_file.read_text(encoding="utf-8"))
    if spec["model"].get("type") != "BPE" or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise KilnError(f"{tok_file}: only byte-level BPE tokenizers convert (found {spec['model'].get('type')})")
    hf = AutoTokenizer.from_pretrained(str(checkpoint))
    vocab = hf.get_vocab()
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise KilnError(f"{tok_file}: token ids are not contiguous")
    special = set(hf.all_special_ids) | {vocab[t] for t in SPECIAL_TOKENS if t in vocab}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's regex split, as our ByteLevel pre-tokenizer does
    writer.add_token_list([t for t, _ in by_id])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in by_id])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(hf.bos_token_id)
    writer.add_eos_token_id(hf.eos_token_id)
    writer.add_pad_token_id(hf.pad_token_id)
    if END in vocab:
        writer.add_eot_token_id(vocab[END])  # a chat turn ends here
    writer.add_add_bos_token(False)  # kiln's tokenizer adds no special tokens on its own
    writer.add_add_eos_token(False)
    if hf.chat_template:
        writer.add_chat_template(hf.chat_template)


def convert_to_gguf(checkpoint: Path, out: Path, name: str = "kiln", version: str = "") -> Path:
    """Write `checkpoint` (a Llama save_pretrained folder) as a GGUF F16 file at `out`."""
    import gguf

    checkpoint = Path(checkpoint)
    cfg, shards = _llama_checkpoint(checkpoint)
    with atomic_path(Path(out)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="llama")
        _model_metadata(writer, cfg, name, version)
        _tokenizer_metadata(writer, checkpoint)
        _add_tensors(writer, shards, cfg)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out)


def _llama_checkpoint(checkpoint: Path) -> tuple[dict, list[Path]]:
    """The config.json and the safetensors shards of a Llama checkpoint, or a KilnError saying what is missing."""
    config_file = checkpoint / "config.json"
    if not config_file.is_file():
        raise KilnError(f"{checkpoint}: not a model folder (no config.json)")
    cfg = json.loads(config_file.read_text())
    if cfg.get("model_type") != "llama":
        raise KilnError(f"{checkpoint}: architecture {cfg.get('model_type')!r} is not supported (only llama)")
    shards = sorted(checkpoint.glob("*.safetensors"))
    if not shards:
        raise KilnError(f"{checkpoint}: no .safetensors weights")
    return cfg, shards


def _model_metadata(writer, cfg: dict, name: str, version: str) -> None:
    """The name, file type and the hyper-parameters llama.cpp builds the graph from."""
    import gguf

    n_heads = cfg["num_attention_heads"]
    writer.add_name(name)
    if version:
        writer.add_string("general.version", version)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads", n_heads))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta")))
    writer.add_rope_dimension_count(cfg["hidden_size"] // n_heads)


def _add_tensors(writer, shards: list[Path], cfg: dict) -> None:
    """Every tensor under its GGUF name: q/k rows permuted for llama.cpp's RoPE, matrices in F16."""
    import gguf
    import torch
    from safetensors.torch import load_file

    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_heads)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    for shard in shards:
        for hf_name, tensor in load_file(str(shard)).items():
            if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                continue  # llama.cpp reuses token_embd for the output when there is no output.weight
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise KilnError(f"{shard.name}: tensor {hf_name} has no GGUF name for llama")
            data = tensor.to(torch.float32).numpy()
            if hf_name.endswith("q_proj.weight"):
                data = rotary_permute(data, n_heads)
            elif hf_name.endswith("k_proj.weight"):
                data = rotary_permute(data, n_kv)
            # matrices in F16; norms (1-D) stay F32, as llama.cpp expects
            writer.add_tensor(gguf_name, data.astype(np.float16 if data.ndim == 2 else np.float32))


@contextlib.contextmanager
def quiet_native():
    """Silence what llama.cpp's C code prints on stdout/stderr (a line per tensor when quantizing)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def quantize(f16: Path, out: Path, kind: str, threads: int = 0) -> Path:
    """llama.cpp's quantizer: `kind` is Q8_0 or Q4_K_M."""
    import llama_cpp

    ftypes = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}
    if kind not in ftypes:
        raise KilnError(f"unknown quantization {kind!r}; choose {', '.join(ftypes)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[kind]
    params.nthread = threads
    with atomic_path(Path(out)) as tmp:
        with quiet_native():
            code = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0 or not tmp.exists():
            raise KilnError(f"llama.cpp could not quantize {f16} to {kind} (code {code})")
    return Path(out)


def export_all(checkpoint: Path, out_dir: Path, name: str, version: str = "") -> dict[str, Path]:
    """F16, Q8_0 and Q4_K_M files of `checkpoint` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"F16": convert_to_gguf(checkpoint, out_dir / f"{name}-F16.gguf", name, version)}
    for kind in QUANTS:
        files[kind] = quantize(files["F16"], out_dir / f"{name}-{kind}.gguf", kind)
    return files
