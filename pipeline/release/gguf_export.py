"""gguf_model: convert the final HF checkpoint to GGUF F16, then quantize with llama.cpp.

The converter is written on the `gguf` library's writer and tensor-name map: the model's
hyper-parameters (grouped-query heads, RoPE base and its linear or Llama 3 scaling), the whole
tokenizer, then every tensor under its GGUF name (the output projection too when it is not tied
to the embedding). Tokenizers: byte-level BPE (kiln's own and GPT-2's pre-tokenizer, SmolLM's,
Llama 3's) as the `gpt2` model with its merges, and SentencePiece BPE with byte fallback (Llama 2,
Mistral, TinyLlama) as the `llama` model with scores; special-token ids and the chat template
with both. Any other architecture or tokenizer is refused with one line naming it. Q8_0 and
Q4_K_M come from llama.cpp's own quantizer (`llama_model_quantize` through llama-cpp-python).
Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np

from pipeline.errors import KilnError
from pipeline.gguf import quiet_native
from pipeline.io import atomic_path
from pipeline.train.tokenizer import (
    BYTE_LEVEL_BPE,
    BYTE_PIECE,
    END,
    SENTENCEPIECE_BPE,
    SPECIAL_TOKENS,
    tokenizer_kind,
    tokenizer_parts,
)

QUANTS = ("Q8_0", "Q4_K_M")


def rotary_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotary layout to llama.cpp's.

    HF applies RoPE to the two halves of each head's dimensions ("rotate_half"); llama.cpp
    rotates adjacent pairs. Per head, rows [0..d/2) and [d/2..d) are interleaved:
    (n_heads, 2, d/2, in) -> (n_heads, d/2, 2, in).
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# The byte-level pre-tokenizers llama.cpp knows, by the tokenizer.json that asks for each:
# GPT-2's regex alone (kiln's own tokenizer), single digits split first (SmolLM), Llama 3's regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_level_pre(spec: dict, where: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json, or a KilnError."""
    parts = [p for p in tokenizer_parts(spec.get("pre_tokenizer")) if p.get("type") != "ByteLevel"]
    byte_level = [p for p in tokenizer_parts(spec.get("pre_tokenizer")) if p.get("type") == "ByteLevel"]
    if byte_level and byte_level[0].get("add_prefix_space"):
        raise KilnError(f"{where}: a byte-level pre-tokenizer that adds a prefix space has no llama.cpp equivalent")
    regex = bool(byte_level) and byte_level[0].get("use_regex", True)
    if not parts and regex:
        return "gpt-2"
    if len(parts) == 1 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") and regex:
        return "smollm"
    split = len(parts) == 1 and parts[0].get("type") == "Split" and not regex
    if split and parts[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    shown = "+".join(p.get("type", "?") for p in tokenizer_parts(spec.get("pre_tokenizer")))
    raise KilnError(f"{where}: unsupported byte-level pre-tokenizer {shown} (gpt-2, SmolLM's and Llama 3's convert)")


def _byte_level_vocab(writer, spec: dict, by_id: list, special: set[int], where: Path) -> None:
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(byte_level_pre(spec, where))
    writer.add_token_list([t for t, _ in by_id])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in by_id])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])


def _sentencepiece_vocab(writer, spec: dict, by_id: list, special: set[int], unk: int | None) -> None:
    """llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined piece scores
    highest: a piece's score is minus the rank of the merge that makes it, so it merges in the
    order the BPE merge list gives. Fallback bytes <0xNN> are BYTE tokens."""
    import gguf

    rank: dict[str, int] = {}
    for i, m in enumerate(spec["model"]["merges"]):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, i)
    types = []
    for token, i in by_id:
        if i == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in special:
            types.append(gguf.TokenType.CONTROL)
        elif BYTE_PIECE.fullmatch(token):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    prepend = {p.get("type"): p for key in ("normalizer", "pre_tokenizer") for p in tokenizer_parts(spec.get(key))}
    space_prefix = "Prepend" in prepend or prepend.get("Metaspace", {}).get("prepend_scheme", "never") != "never"
    writer.add_tokenizer_model("llama")
    writer.add_token_list([t for t, _ in by_id])
    writer.add_token_scores([-float(rank.get(t, 0)) for t, _ in by_id])
    writer.add_token_types(types)
    writer.add_add_space_prefix(space_prefix)
    if unk is not None:
        writer.add_unk_token_id(unk)


def _tokenizer_metadata(writer, checkpoint: Path) -> None:
    """The tokenizer a GGUF carries: byte-level BPE (`gpt2` model) or SentencePiece BPE (`llama`
    model, with byte fallback), special-token ids, whether a BOS starts a text, the chat template."""
    from transformers import AutoTokenizer

    tok_file = checkpoint / "tokenizer.json"
    if not tok_file.is_file():
        raise KilnError(f"{checkpoint}: no tokenizer.json beside the weights (a GGUF carries its tokenizer)")
    spec = json.loads(tok_file.read_text(encoding="utf-8"))
    kind = tokenizer_kind(spec)
    if kind not in (BYTE_LEVEL_BPE, SENTENCEPIECE_BPE):
        raise KilnError(f"{tok_file}: unsupported tokenizer {kind} (byte-level BPE or SentencePiece BPE convert)")
    hf = AutoTokenizer.from_pretrained(str(checkpoint))
    vocab = hf.get_vocab()
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise KilnError(f"{tok_file}: token ids are not contiguous")
    special = set(hf.all_special_ids) | {vocab[t] for t in SPECIAL_TOKENS if t in vocab}
    special |= {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    if kind == BYTE_LEVEL_BPE:
        _byte_level_vocab(writer, spec, by_id, special, tok_file)
    else:
        _sentencepiece_vocab(writer, spec, by_id, special, hf.unk_token_id)
    for add, token_id in ((writer.add_bos_token_id, hf.bos_token_id), (writer.add_eos_token_id, hf.eos_token_id),
                          (writer.add_pad_token_id, hf.pad_token_id)):  # fmt: skip
        if token_id is not None:
            add(token_id)
    if END in vocab:
        writer.add_eot_token_id(vocab[END])  # a chat turn ends here
    # as the HF tokenizer does: kiln's adds nothing, a Llama SentencePiece one starts with BOS
    starts = hf("a")["input_ids"][:1]
    writer.add_add_bos_token(hf.bos_token_id is not None and starts == [hf.bos_token_id])
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
        arch = (cfg.get("architectures") or [cfg.get("model_type")])[0]
        raise KilnError(f"{checkpoint}: unsupported architecture {arch} (GGUF export takes Llama-architecture models)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise KilnError(f"{checkpoint}: unsupported Llama variant with attention or MLP biases")
    rope_scaling(cfg, checkpoint)  # an unknown scaling is refused before anything is written
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
    writer.add_rope_freq_base(_rope_theta(cfg))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    if head_dim != cfg["hidden_size"] // n_heads:  # llama.cpp assumes hidden / heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    kind, scaling = rope_scaling(cfg, Path("."))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _rope_theta(cfg: dict) -> float:
    return float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10_000.0)


def rope_scaling(cfg: dict, where: Path) -> tuple[str, dict]:
    """The RoPE scaling of a config ("default", "linear" or "llama3") and its parameters; a KilnError
    for another. transformers 5 writes it as `rope_parameters`, earlier versions as `rope_scaling`."""
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ("default", "linear", "llama3"):
        raise KilnError(f"{where}: unsupported RoPE scaling {kind!r} (default, linear and llama3 convert)")
    return kind, scaling


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """Llama 3's per-frequency RoPE divisors, which llama.cpp reads from a `rope_freqs` tensor:
    long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly."""
    _, s = rope_scaling(cfg, Path("."))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / _rope_theta(cfg) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    old, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * np.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / s["factor"] + smooth)
    factors = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, s["factor"], blended))
    return factors.astype(np.float32)


def _add_tensors(writer, shards: list[Path], cfg: dict) -> None:
    """Every tensor under its GGUF name: q/k rows permuted for llama.cpp's RoPE, matrices in F16."""
    import gguf
    import torch
    from safetensors.torch import load_file

    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_heads)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    if rope_scaling(cfg, Path("."))[0] == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(cfg))
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
