"""Tiny random causal LMs of every family the fused-loss tests cover, with their final-logit transforms set so
that they matter (logits scaled up, small soft caps). Each factory returns an fp32 model in eval mode."""

from __future__ import annotations

import torch

VOCAB = 251  # as tests.recipes.helpers.VOCAB, so learnable_store() data fits
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)

# name -> (config class, model class, config overrides); the model classes are the ones AutoModelForCausalLM picks
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama_untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=8)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(num_key_value_heads=4)),  # lm_head has a bias
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8, final_logit_softcapping=4.0,
                                                         query_pre_attn_scalar=8, sliding_window=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=8, final_logit_softcapping=3.0,
                                                             query_pre_attn_scalar=8, sliding_window=16)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=0.3)),  # logits / 0.3
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=2.5)),  # logits * 2.5
}


def tiny_family_model(name: str, seed: int = 0, head_scale: float = 40.0) -> torch.nn.Module:
    """A tiny random model of family ``name`` (a key of :data:`FAMILIES`), lm_head weights scaled by
    ``head_scale`` (logit std of several units, so soft caps and scales change the losses)."""
    import transformers

    config_cls, model_cls, overrides = FAMILIES[name]
    config = getattr(transformers, config_cls)(**{**_COMMON, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    return model


# Size overrides for any family's config (the names families use for width, depth and heads); attributes a
# config does not have are left alone.
_ANY_FAMILY = dict(_COMMON, head_dim=8, n_embd=32, n_layer=2, n_head=4, d_model=32, num_layers=2, ffn_dim=48,
                   n_positions=128)


def any_family_model(model_type: str, max_parameters: int = 3_000_000, head_scale: float = 40.0):
    """A tiny random ``AutoModelForCausalLM`` of ``model_type`` with its default config shrunk by
    :data:`_ANY_FAMILY`, or None when that config cannot be built or stays above ``max_parameters``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(model_type)
        for key, value in _ANY_FAMILY.items():
            if hasattr(config, key):
                setattr(config, key, value)
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if size > max_parameters:
            return None
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float().eval()
        head = model.get_output_embeddings()
        if head is not None and isinstance(getattr(head, "weight", None), torch.Tensor):
            with torch.no_grad():
                head.weight.mul_(head_scale)
        return model
    except Exception:  # noqa: BLE001 (a family whose tiny config does not build is simply not covered)
        return None
