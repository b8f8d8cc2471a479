"""The trained-model outputs of a run directory, shared by ``tellneo distill`` and ``tellneo tell``.

* ``adapter/`` (LoRA) or ``model/`` (full fine-tuning): ``save_pretrained`` output with the tokenizer;
* ``student_base/`` (distill, LoRA, built or GGUF student): the student the adapter was trained on, as a plain HF
  directory; the adapter's ``base_model_name_or_path`` names it (an absolute path: PEFT resolves that field from
  the working directory, not from the adapter's), so ``AutoPeftModelForCausalLM.from_pretrained(run/"adapter")``
  loads the trained student;
* ``merged/`` (``--save-merged``): the adapter merged into the base weights, cast to ``--merged-dtype``, with
  ``use_cache`` on again (training turns it off);
* ``model.gguf`` (``--save-gguf``): the merged (or fully fine-tuned) model as one GGUF file in ``--merged-dtype``,
  tokenizer included (:func:`tellneo.export.export_gguf`).

Everything is written atomically (a staging directory or temporary file, then a rename).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tellneo._names import MERGED_DTYPE_NAMES

__all__ = ["MERGED_DTYPES", "OUTPUT_OPTIONS", "STUDENT_BASE", "check_output_options", "merged_model",
           "check_gguf_export", "point_adapter_at", "save_model_outputs", "source_pre_tokenizer"]

STUDENT_BASE = "student_base"
GGUF_NAME = "model.gguf"
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MERGED_DTYPES: dict[str, torch.dtype] = {name: _TORCH_DTYPES[name] for name in MERGED_DTYPE_NAMES}
# config fields that only choose what is saved: left out of a run's manifest, so adding them on --resume is the same run
OUTPUT_OPTIONS = ("save_merged", "merged_dtype", "save_gguf")


def check_output_options(merged_dtype: str) -> None:
    """Raise RecipeError for a ``merged_dtype`` that :func:`merged_model` does not know."""
    from tellneo.recipes.errors import RecipeError

    if merged_dtype not in MERGED_DTYPES:
        raise RecipeError(f"merged-dtype must be one of {', '.join(MERGED_DTYPES)}, got {merged_dtype!r}")


def merged_model(model: nn.Module, dtype: str = "fp32") -> nn.Module:
    """The plain transformers model of a ``PeftModel`` with its LoRA adapters merged in (the merge runs in the
    weights' own precision, then the result is cast to ``dtype``: ``"fp32"``, ``"bf16"`` or ``"fp16"``), in eval
    mode with ``config.use_cache = True``. A model without adapters is only cast. The PEFT wrapper is consumed
    (``merge_and_unload``); keep the adapter saved first."""
    if dtype not in MERGED_DTYPES:
        raise ValueError(f"merged dtype must be one of {sorted(MERGED_DTYPES)}, got {dtype!r}")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.to(MERGED_DTYPES[dtype]).eval()
    model.config.use_cache = True
    return model


def point_adapter_at(model: nn.Module, base_dir: str | os.PathLike[str]) -> str:
    """Make ``base_dir`` (absolute) the ``base_model_name_or_path`` that PEFT writes into adapter configs of
    ``model`` (call before ``get_peft_model``; a ``PeftModel``'s existing configs are updated too)."""
    path = str(Path(base_dir).resolve())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.name_or_path = path
    base.config._name_or_path = path
    for config in getattr(model, "peft_config", {}).values():
        config.base_model_name_or_path = path
    return path


def check_gguf_export(model: nn.Module, tokenizer: Any) -> None:
    """Raise RecipeError (before any training) when ``--save-gguf`` could not write this model or tokenizer."""
    from tellneo.export import ExportError, check_exportable
    from tellneo.recipes.errors import RecipeError

    try:
        check_exportable(model, tokenizer)
    except ExportError as exc:
        raise RecipeError(f"--save-gguf: {exc}") from None


def source_pre_tokenizer(model_source: str | os.PathLike[str] | None) -> str | None:
    """llama.cpp's pre-tokenizer name of the model a run started from, when it is a GGUF file (``None`` = the
    embedded SmolLM2 GGUF); None for an HF directory (the exported file then says ``"default"``)."""
    from tellneo.export import gguf_pre_tokenizer
    from tellneo.models import smollm2_gguf

    path = smollm2_gguf() if model_source is None else Path(model_source)
    return gguf_pre_tokenizer(path) if path.is_file() else None


def save_model_outputs(model: nn.Module, out: str | os.PathLike[str], tokenizer: Any, *, mode: str,
                       save_merged: bool = False, merged_dtype: str = "fp32", save_gguf: bool = False,
                       model_source: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Write the adapter (``mode="lora"``) or full model, and on request the merged model and its GGUF file, into
    the run directory ``out``. Returns ``{output: path}`` of what was written. ``model`` is consumed when a merged
    copy is made. ``model_source`` (the run's ``--teacher`` / ``--model``) gives the GGUF file its pre-tokenizer
    name (:func:`source_pre_tokenizer`)."""
    from tellneo.recipes.reporting import save_pretrained_atomic

    out = Path(out)
    written = {}
    name = "adapter" if mode == "lora" else "model"
    written[name] = str(save_pretrained_atomic(model, out / name, tokenizer))
    if not (save_merged or save_gguf):
        return written
    final = merged_model(model, merged_dtype)
    if save_merged and mode == "lora":
        written["merged"] = str(save_pretrained_atomic(final, out / "merged", tokenizer))
    if save_gguf:
        from tellneo.export import export_gguf

        written["gguf"] = str(export_gguf(final, tokenizer, out / GGUF_NAME,
                                          pre_tokenizer=source_pre_tokenizer(model_source)))
    return written
