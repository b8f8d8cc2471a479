"""Every causal-LM family of the installed transformers that builds as a tiny config: tellneo's head logits
(final hidden state -> lm_head -> the family's transform) equal ``model(...).logits``, or the model is refused
with an error. Never a silent mismatch: BERT-style prediction heads, unknown soft caps and nested heads must be
refused, not computed on other logits."""

from __future__ import annotations

import logging

import pytest
import torch

from tellneo.recipes.common import last_hidden_state
from tellneo.recipes.head import UnsupportedHeadError, head_logits, read_head
from tests.recipes.families import any_family_model
from tests.recipes.helpers import one_thread  # noqa: F401 (fixture)

# the families named in issue 12 (and the transformed ones): these must be computed, not refused
MUST_WORK = {"llama", "qwen2", "qwen3", "mistral", "phi", "phi3", "gemma2", "gemma3_text", "granite", "cohere",
             "cohere2", "olmo2", "granitemoe", "vaultgemma", "hyperclovax"}


@pytest.mark.slow
def test_every_family_is_computed_exactly_or_refused():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    ids = torch.randint(3, 251, (1, 10), generator=torch.Generator().manual_seed(0))
    exact, refused, mismatched = [], [], []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        model = any_family_model(model_type)
        if model is None:
            continue
        try:
            with torch.no_grad():
                want = model(ids, use_cache=False).logits.float()
        except Exception:  # noqa: BLE001 (the family's own forward fails on the tiny config: not covered)
            continue
        try:
            head = read_head(model)
            with torch.no_grad():
                got = head_logits(head, last_hidden_state(model, {"input_ids": ids}))
        except (UnsupportedHeadError, RuntimeError, TypeError) as e:  # loud: an error, not a wrong number
            refused.append((model_type, type(e).__name__))
            continue
        err = float((got - want).abs().max() / want.abs().max())
        (exact if err <= 1e-5 else mismatched).append((model_type, err))
        del model
    logging.getLogger("tellneo").info("exact %d, refused %s", len(exact), refused)
    assert not mismatched, mismatched
    missing = MUST_WORK - {m for m, _ in exact}
    assert not missing, (missing, refused)
