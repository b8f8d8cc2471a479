"""Every family's own logits: the trainer's CE / KD (and gradients), the evaluation metrics and the offline top-k
equal what ``model(...).logits`` gives, for tiny random models of each family the installed transformers ships,
with logits scaled up so that Gemma's soft cap and Granite's / Cohere's scales change the numbers (they did not
before: the head was ``hidden @ W^T`` for every family). Teacher and student are of different families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tellneo.data import PackedCollator, PackedDataset
from tellneo.recipes.evaluate import distill_metrics
from tellneo.recipes.head import UnsupportedHeadError, head_transform
from tellneo.recipes.neo import KDSettings, NeoTrainer
from tellneo.recipes.offline import precompute_teacher_topk
from tellneo.recipes.training import TrainSettings
from tests.recipes.families import FAMILIES, tiny_family_model
from tests.recipes.helpers import learnable_store, one_thread  # noqa: F401 (fixture)

NAMES = list(FAMILIES)
# each student is distilled from the next family in the list (a Gemma-2 student from a Gemma-3 teacher, Granite
# from Cohere, Cohere from Llama, ...): two different transforms in every call
PAIRS = [(s, NAMES[(i + 1) % len(NAMES)]) for i, s in enumerate(NAMES)]
RTOL = 1e-5


def _batch():
    ds = PackedDataset(learnable_store(n=16), 32, seed=0)
    return PackedCollator()(ds.__getitems__([0, 1]))


def _logits(model, batch):
    return model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[:, :-1].float()


def _reference(student, teacher, batch, alpha):
    """(loss, ce, kl) from the models' own logits with torch.nn.functional."""
    s = _logits(student, batch)
    with torch.no_grad():
        t = _logits(teacher, batch)
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    ce = F.cross_entropy(s[valid], labels[valid])
    kl = F.kl_div(F.log_softmax(s[valid], -1), F.log_softmax(t[valid], -1), log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * kl, ce, kl, s[valid], t[valid], labels[valid]


def _trainer(tmp_path, student, teacher, kd):
    args = TrainSettings(max_steps=1).training_arguments(tmp_path / "ckpt", disable_tqdm=True)
    return NeoTrainer(model=student, args=args, train_dataset=None, data_collator=PackedCollator(), teacher=teacher,
                      kd=kd)


def _rel(a, b):
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).detach())


@pytest.mark.parametrize("student_name,teacher_name", PAIRS, ids=[f"{s}<-{t}" for s, t in PAIRS])
def test_trainer_loss_grads_and_metrics_are_the_models_own(tmp_path, student_name, teacher_name):
    student = tiny_family_model(student_name, seed=1).train()
    teacher = tiny_family_model(teacher_name, seed=2)
    batch = _batch()
    kd = KDSettings(alpha=0.6)
    trainer = _trainer(tmp_path, student, teacher, kd)

    loss = trainer.compute_loss(student, dict(batch))
    got_grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    ref, ce, kl, s, t, lab = _reference(student, teacher, batch, kd.alpha)
    ref_grads = torch.autograd.grad(ref, list(student.parameters()), allow_unused=True)
    assert _rel(loss, ref) <= RTOL, (float(loss), float(ref))
    part_ce, part_kd = trainer._part_sums.tolist()
    assert part_ce == pytest.approx(float(ce), rel=RTOL) and part_kd == pytest.approx(float(kl), rel=RTOL)
    for (name, _), a, b in zip(student.named_parameters(), got_grads, ref_grads):
        if b is None:
            assert a is None or not a.any(), name
            continue
        assert _rel(a, b) <= 1e-4, (name, _rel(a, b))

    # the transform matters here: the bare-head loss would be far off for the transformed families
    if head_transform(student).softcap or head_transform(student).logit_scale != 1.0:
        bare = trainer._student_transform
        trainer._student_transform = type(bare)()
        try:
            wrong = trainer.compute_loss(student, dict(batch))
        finally:
            trainer._student_transform = bare
        assert _rel(wrong, ref) > 1e-2

    # evaluation metrics, from the same logits
    student.eval()
    with torch.no_grad():
        ref_eval = _reference(student, teacher, batch, kd.alpha)
    _, ce_e, kl_e, s, t, lab = ref_eval
    m = distill_metrics(student, [batch], teacher=teacher)
    assert m["ce"] == pytest.approx(float(ce_e), rel=RTOL)
    assert m["kl"] == pytest.approx(float(kl_e), rel=RTOL)
    assert m["teacher_ce"] == pytest.approx(float(F.cross_entropy(t, lab)), rel=RTOL)
    assert m["top1_agreement"] == pytest.approx(float((s.argmax(-1) == t.argmax(-1)).float().mean()))
    alone = distill_metrics(student, [batch])  # CE only (the `tellneo tell` evaluation)
    assert alone["ce"] == pytest.approx(float(ce_e), rel=RTOL)


@pytest.mark.parametrize("name", ["gemma2", "granite", "cohere", "llama_tied"])
def test_offline_topk_are_the_teachers_own_logprobs(tmp_path, name):
    teacher = tiny_family_model(name)
    ds = PackedDataset(learnable_store(n=16), 32, seed=0)
    precompute_teacher_topk(teacher, ds, tmp_path / "topk", k=6, rows_per_shard=4, temperature=2.0, progress=False)
    with np.load(tmp_path / "topk" / "epoch-000" / "shard-00000.npz") as z:
        ids, lps = torch.from_numpy(z["ids"]).long(), torch.from_numpy(z["logprobs"])
    batch = ds.batch([0, 1, 2, 3])
    with torch.no_grad():
        logits = teacher(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits.float()
    want = torch.log_softmax(logits / 2.0, -1).topk(6, dim=-1)
    torch.testing.assert_close(lps, want.values, rtol=RTOL, atol=1e-5)
    assert torch.equal(ids, want.indices)


def test_triton_backend_with_per_model_transforms(tmp_path):
    """The Triton kernels (interpreter on CPU) with a soft-capped Gemma-2 student and a scaled Granite teacher."""
    student = tiny_family_model("gemma2", seed=1).train()
    teacher = tiny_family_model("granite", seed=2)
    batch = _batch()
    kd = KDSettings(alpha=0.5, divergence="forward_kl", backend="triton")
    trainer = _trainer(tmp_path, student, teacher, kd)
    loss = trainer.compute_loss(student, dict(batch))
    head = student.get_output_embeddings().weight
    (g,) = torch.autograd.grad(loss, [head])
    ref = _reference(student, teacher, batch, kd.alpha)[0]
    (g_ref,) = torch.autograd.grad(ref, [head])
    assert _rel(loss, ref) <= RTOL
    assert _rel(g, g_ref) <= 1e-4


def test_unknown_heads_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_family_model("llama_untied")
    model.config.final_logit_softcapping = 5.0  # Llama's forward ignores it; we cannot know what was meant
    with pytest.raises(UnsupportedHeadError, match="final_logit_softcapping=5.0"):
        head_transform(model)
    model = tiny_family_model("qwen2")
    model.config.logits_scaling = 2.0  # multiplied (HyperCLOVA X) or divided (Granite)? unknown for qwen2
    with pytest.raises(UnsupportedHeadError, match="logits_scaling=2.0"):
        _trainer(tmp_path, model, None, KDSettings(alpha=0.0))
    model = tiny_family_model("qwen2")
    model.config.logits_scaling = 1.0  # the identity, whichever way it is applied
    assert head_transform(model).logit_scale == 1.0

    lora = get_peft_model(tiny_family_model("llama_untied"),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(UnsupportedHeadError, match="not a plain torch.nn.Linear"):
        head_transform(lora)
    gemma = tiny_family_model("gemma2")
    gemma.config.final_logit_softcapping = None  # Gemma-2 without a cap is a known configuration
    assert head_transform(gemma).softcap is None
