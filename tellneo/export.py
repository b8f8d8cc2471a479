"""Export a trained (merged) causal LM with its tokenizer as one GGUF file, for llama.cpp-based tools.

:func:`export_gguf` writes the llama.cpp layout with the ``gguf`` package's ``GGUFWriter``: ``general.*`` and
``llama.*`` hyper-parameters, the tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q``, ...,
``output``; a tied output head is left out, as llama.cpp does), the query/key projections permuted into
llama.cpp's rotary layout, and the tokenizer (``tokenizer.ggml.*``: tokens, token types, merges, special ids,
chat template). transformers reads the file back with ``from_pretrained(directory, gguf_file=name)`` — model and
tokenizer (tested to reproduce the logits and the token ids).

Supported: the Llama architecture (``model_type == "llama"``: Llama, SmolLM2, ...) with plain RoPE, and
byte-level BPE tokenizers (GPT-2 / Llama-3 / SmolLM style). Anything else is refused with a message naming what
is not supported. Matrices are written in ``fp32``, ``fp16`` or ``bf16``; 1-D tensors (norms) always in fp32,
like llama.cpp.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["GGUF_DTYPES", "ExportError", "check_exportable", "export_gguf", "gguf_pre_tokenizer"]

GGUF_DTYPES = ("fp32", "fp16", "bf16")


class ExportError(ValueError):
    """The model or tokenizer cannot be written as GGUF (unsupported architecture, feature or tokenizer)."""


def gguf_pre_tokenizer(path: str | os.PathLike[str]) -> str | None:
    """The ``tokenizer.ggml.pre`` value of an existing GGUF file (llama.cpp's name for the pre-tokenizer), or
    None. Pass it to :func:`export_gguf` for a model that came from that file."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    return None if field is None else str(field.contents())


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ExportError(f"GGUF export supports plain RoPE only; this model uses rope_type {rope_type!r}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ExportError("the model config has no rope_theta")
    return float(theta)


def _check_model(model: nn.Module) -> Any:
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise ExportError(f"GGUF export supports the Llama architecture (model_type 'llama', e.g. SmolLM2); this "
                          f"model is {getattr(config, 'model_type', type(model).__name__)!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ExportError(f"GGUF export does not support Llama models with {flag}=True")
    if hasattr(model, "peft_config"):
        raise ExportError("merge the LoRA adapters first (tellneo.recipes.outputs.merged_model or "
                          "merge_and_unload()): GGUF holds plain weights")
    return config


def _to_llama_cpp_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF keeps each head's rotary halves as ``[first half | second half]`` of its rows; llama.cpp interleaves
    them (row pairs). ``[heads * head_dim, in]`` -> same shape, rows reordered (transformers undoes this)."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _array(tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """``(numpy array, raw GGML type or None)`` of a tensor in the file's dtype (1-D tensors stay fp32)."""
    from gguf import GGMLQuantizationType

    tensor = tensor.detach().cpu()
    if tensor.ndim == 1 or dtype == "fp32":
        return tensor.float().contiguous().numpy(), None
    if dtype == "fp16":
        return tensor.half().contiguous().numpy(), None
    return tensor.bfloat16().contiguous().view(torch.int16).numpy().view(np.uint16), GGMLQuantizationType.BF16


def _tensors(model: nn.Module, config: Any) -> list[tuple[str, torch.Tensor]]:
    from gguf import MODEL_ARCH, get_tensor_name_map

    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    out = []
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp (and transformers' reader) tie the head to token_embd when output is absent
        base, _, suffix = key.rpartition(".")
        name = names.get_name(base)
        if name is None:
            raise ExportError(f"GGUF export: no llama.cpp name for the tensor {key!r}")
        if name.endswith(".attn_q"):
            value = _to_llama_cpp_rotary(value, heads)
        elif name.endswith(".attn_k"):
            value = _to_llama_cpp_rotary(value, kv_heads)
        out.append((f"{name}.{suffix}", value))
    return out


def _tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Everything ``tokenizer.ggml.*`` needs, from an HF fast tokenizer with a byte-level BPE model."""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers-backed) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or \
        "ByteLevel" in json.dumps(spec.get("decoder"))
    if model.get("type") != "BPE" or not byte_level:
        raise ExportError(f"GGUF export supports byte-level BPE tokenizers (GPT-2 / Llama-3 / SmolLM style); this "
                          f"tokenizer is a {model.get('type')} model"
                          f"{'' if byte_level else ' without byte-level pre-tokenization'}")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ExportError(f"the tokenizer has {len(vocab)} tokens but the model's embedding table only "
                          f"{vocab_size} rows")
    tokens: list[str | None] = [None] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
    types = [TokenType.NORMAL] * vocab_size
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED
    for index, token in enumerate(tokens):
        if token is None:  # embedding rows beyond the tokenizer (padded tables)
            tokens[index], types[index] = f"[PAD{index}]", TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    fields: dict[str, Any] = {
        "tokens": tokens, "types": [int(t) for t in types], "merges": merges,
        "add_bos": bool(probe) and probe[0] == tokenizer.bos_token_id and tokenizer.bos_token_id is not None,
        "add_eos": bool(probe) and probe[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id is not None,
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }
    for name in ("bos", "eos", "unk", "pad"):
        fields[f"{name}_id"] = getattr(tokenizer, f"{name}_token_id", None)
    return fields


def check_exportable(model: nn.Module, tokenizer: Any) -> None:
    """Raise :class:`ExportError` unless :func:`export_gguf` can write ``model`` (once its adapters are merged)
    and ``tokenizer``; cheap, so a run can check before it trains."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = _check_model(base)
    _rope_theta(config)
    _tokenizer_fields(tokenizer, int(base.get_input_embeddings().weight.shape[0]))


def export_gguf(model: nn.Module, tokenizer: Any, path: str | os.PathLike[str], *, dtype: str | None = None,
                name: str | None = None, pre_tokenizer: str | None = None) -> Path:
    """Write ``model`` (a Llama-architecture ``*ForCausalLM`` without adapters) and ``tokenizer`` (a fast
    byte-level BPE tokenizer) to the GGUF file ``path`` (atomically: a temporary file, then a rename).

    ``dtype``: ``"fp32"``, ``"fp16"`` or ``"bf16"`` for the matrices (default: the model's parameter dtype);
    ``name``: ``general.name`` (default: the config's ``_name_or_path`` basename); ``pre_tokenizer``:
    llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``, e.g. ``"smollm"``; take it from the source GGUF with
    :func:`gguf_pre_tokenizer`; default ``"default"``, which transformers reads as the GPT-2 split). Raises
    :class:`ExportError` for an unsupported model or tokenizer. Returns the path.
    """
    from gguf import GGUFWriter, LlamaFileType

    config = _check_model(model)
    if dtype is None:
        dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(next(model.parameters()).dtype, "fp32")
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    rope_theta = _rope_theta(config)
    vocab_size = int(model.get_input_embeddings().weight.shape[0])
    tok = _tokenizer_fields(tokenizer, vocab_size)
    tensors = _tensors(model, config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = GGUFWriter(tmp, arch="llama")
        writer.add_type("model")
        writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model")
        writer.add_file_type({"fp32": LlamaFileType.ALL_F32, "fp16": LlamaFileType.MOSTLY_F16,
                              "bf16": LlamaFileType.MOSTLY_BF16}[dtype])
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(config.num_hidden_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(int(config.num_attention_heads))
        writer.add_head_count_kv(int(config.num_key_value_heads))
        writer.add_rope_dimension_count(int(head_dim))
        if head_dim != config.hidden_size // config.num_attention_heads:
            writer.add_key_length(int(head_dim))
            writer.add_value_length(int(head_dim))
        writer.add_rope_freq_base(rope_theta)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(vocab_size)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer or "default")
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["types"])
        writer.add_token_merges(tok["merges"])
        for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                         ("unk_id", writer.add_unk_token_id), ("pad_id", writer.add_pad_token_id)):
            if tok[key] is not None:
                add(int(tok[key]))
        writer.add_add_bos_token(tok["add_bos"])
        writer.add_add_eos_token(tok["add_eos"])
        writer.add_add_space_prefix(False)
        if tok["chat_template"]:
            writer.add_chat_template(tok["chat_template"])

        for tensor_name, value in tensors:
            array, raw = _array(value, dtype)
            writer.add_tensor(tensor_name, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
