"""tellneo.integrations.transformers.patch_causal_lm: the model's own loss (and gradients) without logits, the
model's own forward everywhere else, reversible, and transformers.Trainer / TRL SFTTrainer unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from tellneo.integrations.transformers import is_patched, patch_causal_lm
from tellneo.ops import fused_linear_kd_reference
from tellneo.recipes.neo import KDSettings
from tests.integrations.gkd_jobs import word_tokenizer
from tests.recipes.helpers import one_thread  # noqa: F401 (fixture)

VOCAB = tiny_llama_config().vocab_size


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    with torch.no_grad():  # logits with std ~ 3, so a wrong loss is far off
        model.lm_head.weight.mul_(20.0)
    return model.train()


def batch(n=2, t=11, seed=1, prompt=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, t), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[1, -2:] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
def test_loss_and_grads_equal_the_models_own(tied):
    model = tiny(tie_word_embeddings=tied)
    inputs = batch()
    stock, g_stock = loss_and_grads(model, inputs)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    handle = patch_causal_lm(model)
    assert is_patched(model)
    fused, g_fused = loss_and_grads(model, inputs)
    hook.remove()
    assert fused.logits is None and seen == [(2, 0, VOCAB)]  # the head projected zero positions
    torch.testing.assert_close(fused.loss, stock.loss, rtol=1e-5, atol=1e-6)
    assert g_fused.keys() == g_stock.keys() and len(g_stock) > 5
    for name in g_stock:
        torch.testing.assert_close(g_fused[name], g_stock[name], rtol=1e-4, atol=1e-6, msg=name)
    assert handle.undo() and not is_patched(model) and "forward" not in vars(model)
    torch.testing.assert_close(model(**inputs).logits, stock.logits)


def test_num_items_in_batch_shift_labels_and_positional_calls():
    model = tiny()
    inputs = batch()
    n = torch.tensor(37)
    stock = model(**inputs, num_items_in_batch=n).loss
    shifted = F.pad(inputs["labels"][:, 2:], (0, 2), value=-100)  # pre-shifted labels win over labels (as in HF)
    stock_shift = model(input_ids=inputs["input_ids"], labels=inputs["labels"], shift_labels=shifted).loss
    assert not torch.allclose(stock_shift, model(**inputs).loss)
    with patch_causal_lm(model):
        torch.testing.assert_close(model(**inputs, num_items_in_batch=n).loss, stock, rtol=1e-5, atol=1e-6)
        out = model(input_ids=inputs["input_ids"], labels=inputs["labels"], shift_labels=shifted)
        torch.testing.assert_close(out.loss, stock_shift, rtol=1e-5, atol=1e-6)
        positional = model(inputs["input_ids"], inputs["attention_mask"], None, None, None, inputs["labels"])
        assert positional.logits is None
        torch.testing.assert_close(positional.loss, model(**inputs).loss)
    assert not is_patched(model)


def test_eval_mode_no_labels_and_generate_are_the_models_own():
    model = tiny()
    inputs = batch()
    with torch.no_grad():
        stock_eval = model.eval()(**inputs)
        model.train()
        stock_nolabel = model(input_ids=inputs["input_ids"]).logits
        stock_gen = model.eval().generate(inputs["input_ids"][:, :4], max_new_tokens=5, do_sample=False)
    with patch_causal_lm(model), torch.no_grad():
        out = model.eval()(**inputs)  # evaluation keeps logits (metrics need them)
        torch.testing.assert_close(out.logits, stock_eval.logits)
        torch.testing.assert_close(out.loss, stock_eval.loss)
        torch.testing.assert_close(model.train()(input_ids=inputs["input_ids"]).logits, stock_nolabel)
        gen = model.eval().generate(inputs["input_ids"][:, :4], max_new_tokens=5, do_sample=False)
        assert torch.equal(gen, stock_gen)


def test_final_logit_transforms_are_applied():
    """Gemma-2 soft-capping and Granite logit scaling are part of the loss (read from the config)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM

    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    models = [Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=2.0)),
              GraniteForCausalLM(GraniteConfig(**{k: v for k, v in small.items() if k != "head_dim"},
                                               logits_scaling=0.25))]
    inputs = batch()
    for model in models:
        torch.manual_seed(0)
        with torch.no_grad():
            model.get_output_embeddings().weight.normal_(0, 0.5)
        model.train()
        stock = model(**inputs).loss
        with patch_causal_lm(model):
            torch.testing.assert_close(model(**inputs).loss, stock, rtol=1e-5, atol=1e-6,
                                       msg=type(model).__name__)


def test_kd_with_a_teacher_is_the_reference_math():
    student, teacher = tiny(seed=0), tiny(seed=3, num_hidden_layers=3).eval()
    inputs = batch()
    kd = KDSettings(alpha=0.7, divergence="jsd", beta=0.3, temperature=2.0)
    s_logits = student(**inputs).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[:, :-1]
    labels = inputs["labels"][:, 1:]
    eye_s, eye_t = torch.eye(VOCAB), torch.eye(VOCAB)  # logits as "hidden states" through identity heads
    ref = fused_linear_kd_reference(s_logits.reshape(-1, VOCAB), eye_s, t_logits.reshape(-1, VOCAB), eye_t,
                                    labels.reshape(-1), alpha=0.7, divergence="jsd", beta=0.3, temperature=2.0)
    handle = patch_causal_lm(student, teacher=teacher, kd=kd)
    out = student(**inputs)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    parts = handle.last_parts
    torch.testing.assert_close(out.loss.detach(), 0.3 * parts.ce + 0.7 * parts.kd, rtol=1e-5, atol=1e-6)
    assert int(parts.num_tokens) == int((labels != -100).sum())
    out.loss.backward()
    assert student.lm_head.weight.grad is not None and teacher.lm_head.weight.grad is None


def test_patching_through_peft_and_undo():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   init_lora_weights=False))
    inputs = batch()
    stock, g_stock = loss_and_grads(peft_model, inputs)
    handle = patch_causal_lm(peft_model)
    assert is_patched(peft_model) and is_patched(peft_model.get_base_model())
    fused, g_fused = loss_and_grads(peft_model, inputs)
    torch.testing.assert_close(fused.loss, stock.loss, rtol=1e-5, atol=1e-6)
    assert fused.logits is None and set(g_fused) == set(g_stock) and all("lora_" in n for n in g_stock)
    for name in g_stock:
        torch.testing.assert_close(g_fused[name], g_stock[name], rtol=1e-4, atol=1e-6, msg=name)
    handle.undo()
    assert not is_patched(peft_model)


def test_unsupported_model_is_refused():
    from transformers import LlamaModel

    with pytest.raises(TypeError, match="LlamaModel"):
        patch_causal_lm(LlamaModel(tiny_llama_config()))


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, t=13):
        g = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, VOCAB, (n, t), generator=g)
        self.labels = self.ids.clone()
        self.labels[:, :4] = -100
        for i in range(n):  # ragged: different counts of trained tokens per row
            self.labels[i, t - i % 4:] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _train_with_trainer(tmp_path, patched: bool):
    model = tiny()
    handle = patch_causal_lm(model) if patched else None
    args = TrainingArguments(output_dir=str(tmp_path / ("p" if patched else "s")), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=2, learning_rate=0.1, lr_scheduler_type="constant",
                             optim="sgd", logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
                             seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows())
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    if handle is not None:
        assert handle.undo()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_with_gradient_accumulation_is_unchanged(tmp_path):
    stock_losses, stock_params = _train_with_trainer(tmp_path, patched=False)
    fused_losses, fused_params = _train_with_trainer(tmp_path, patched=True)
    assert len(stock_losses) == 2
    assert fused_losses == pytest.approx(stock_losses, rel=1e-4)
    for name in stock_params:
        torch.testing.assert_close(fused_params[name], stock_params[name], rtol=1e-4, atol=1e-5, msg=name)


def test_trl_sft_trainer_with_a_patched_model_is_unchanged(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    rows = _Rows()
    ds = Dataset.from_dict({"input_ids": [r.tolist() for r in rows.ids]})

    def run(patched):
        model = tiny()
        handle = patch_causal_lm(model) if patched else None
        cfg = trl.SFTConfig(output_dir=str(tmp_path / f"sft{patched}"), per_device_train_batch_size=2, max_steps=2,
                            learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                            disable_tqdm=True, use_cpu=True, seed=0)
        trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds,
                                  processing_class=word_tokenizer())
        trainer.train()
        if handle is not None:
            handle.undo()
        return [r["loss"] for r in trainer.state.log_history if "loss" in r]

    stock, fused = run(False), run(True)
    assert len(stock) == 2 and fused == pytest.approx(stock, rel=1e-5)


def test_gradient_checkpointing_and_autocast():
    inputs = batch()
    model = tiny()
    stock, g_stock = loss_and_grads(model, inputs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with patch_causal_lm(model):
        fused, g_fused = loss_and_grads(model, {**inputs, "use_cache": False})
    torch.testing.assert_close(fused.loss, stock.loss, rtol=1e-5, atol=1e-6)
    for name in g_stock:
        torch.testing.assert_close(g_fused[name], g_stock[name], rtol=1e-4, atol=1e-6, msg=name)

    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock_bf16 = model(**inputs).loss
        with patch_causal_lm(model):
            fused_bf16 = model(**inputs).loss
    assert fused_bf16.dtype == torch.float32
    # the head matmul runs in bf16 on both paths; the reductions differ in order, so bf16-level agreement
    torch.testing.assert_close(fused_bf16, stock_bf16.float(), rtol=2e-2, atol=0)
    assert abs(float(fused_bf16) - float(stock.loss)) / float(stock.loss) < 2e-2


@pytest.mark.slow
def test_through_torch_compile():
    inputs = batch()
    stock = tiny()(**inputs).loss
    compiled = torch.compile(tiny(), backend="eager")  # a wrapper around the model: patched through it
    with patch_causal_lm(compiled):
        out = compiled(**inputs)
        assert out.logits is None
        torch.testing.assert_close(out.loss, stock, rtol=1e-5, atol=1e-6)


def test_moe_router_loss_and_tuple_outputs():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             num_local_experts=4, num_experts_per_tok=2,
                                             router_aux_loss_coef=0.5)).train()
    inputs = {**batch(), "output_router_logits": True}
    stock = model(**inputs)
    assert stock.aux_loss is not None
    with patch_causal_lm(model):
        fused = model(**inputs)
        torch.testing.assert_close(fused.loss, stock.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.aux_loss, stock.aux_loss)
        as_tuple = tiny()
        with patch_causal_lm(as_tuple):
            out = as_tuple(**batch(), return_dict=False)
        assert isinstance(out, tuple)
        torch.testing.assert_close(out[0], tiny()(**batch()).loss, rtol=1e-5, atol=1e-6)
