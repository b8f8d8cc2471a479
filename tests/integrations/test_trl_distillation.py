"""tellneo.integrations.trl.FusedDistillationTrainer: TRL's DistillationTrainer with the fused loss computes the
stock per-batch loss and gradients (prompt + completion batches built by hand: no generation needed)."""

from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")
if not hasattr(trl, "DistillationTrainer"):
    pytest.skip("this TRL has no DistillationTrainer", allow_module_level=True)

from tellneo.integrations.trl import FusedDistillationTrainer  # noqa: E402
from tests.integrations.gkd_jobs import tiny_pair, word_tokenizer  # noqa: E402
from tests.recipes.helpers import one_thread  # noqa: E402, F401 (fixture)


def make(fused, tmp_path, beta, temperature):
    from datasets import Dataset

    student, teacher = tiny_pair()
    cfg = trl.DistillationConfig(output_dir=str(tmp_path / str(fused)), per_device_train_batch_size=2, max_steps=2,
                                 logging_steps=1, learning_rate=1e-2,
                                 report_to=[], save_strategy="no", use_cpu=True, bf16=False, beta=beta,
                                 temperature=temperature, max_completion_length=4, disable_tqdm=True)
    cls = FusedDistillationTrainer if fused else trl.DistillationTrainer
    ds = Dataset.from_dict({"prompt": ["t5 t6 t7", "t8 t9"] * 2})
    return cls(model=student, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=word_tokenizer())


def batch():
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(2, 251, (3, 5), generator=g)
    completion = torch.randint(2, 251, (3, 6), generator=g)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :2] = 0  # left padding
    completion_mask = torch.ones_like(completion)
    completion_mask[0, 4:] = 0
    completion_mask[2, 1:] = 0
    return {"prompt_ids": prompt, "prompt_mask": prompt_mask, "completion_ids": completion,
            "completion_mask": completion_mask}


@pytest.mark.parametrize(("beta", "temperature", "num_items"), [(1.0, 1.0, None), (0.5, 0.7, 20), (0.0, 2.0, None)])
def test_loss_and_gradients_equal_the_stock_trainers(tmp_path, beta, temperature, num_items):
    results = []
    for fused in (False, True):
        trainer = make(fused, tmp_path, beta, temperature)
        model = trainer.model.train()
        model.zero_grad(set_to_none=True)
        loss, entropy, n = trainer._compute_loss(model, batch(), num_items)
        loss.backward()
        results.append((loss.detach(), entropy, int(n),
                        {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (ls, es, ns, gs), (lf, ef, nf, gf) = results
    assert ns == nf == int(batch()["completion_mask"].sum())
    torch.testing.assert_close(lf, ls, rtol=1e-5, atol=1e-6)
    assert gs.keys() == gf.keys() and len(gs) > 5
    for name in gs:  # relative to the tensor's scale: the two chunked kernels sum in different orders (fp32)
        err, scale = (gf[name] - gs[name]).abs().max().item(), gs[name].abs().max().item()
        assert err <= 1e-5 * scale, (name, err, scale)
    assert math.isfinite(float(es)) and math.isnan(float(ef))  # the fused loss does not compute the entropy


def test_image_batches_are_refused(tmp_path):
    trainer = make(True, tmp_path, 1.0, 1.0)
    with pytest.raises(ValueError, match="text models only.*pixel_values"):
        trainer._compute_loss(trainer.model, {**batch(), "pixel_values": torch.zeros(1)}, None)


def test_training_with_on_policy_generation_runs(tmp_path):
    trainer = make(True, tmp_path, 0.5, 1.0)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == 2 and all(math.isfinite(r["loss"]) for r in logged)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
