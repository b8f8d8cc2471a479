"""NeoTrainer on tiny random Llamas: the loss is the reference math, no logits are built, gradient accumulation
equals one big batch, training learns, adapters reload, and a resumed run reproduces the uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tellneo.data import PackedCollator, PackedDataset
from tellneo.recipes.common import LoraSettings, attach_lora
from tellneo.recipes.neo import KDSettings, NeoTrainer, build_student
from tellneo.recipes.trainer_utils import MetricsJsonlCallback, last_checkpoint, read_metrics
from tellneo.recipes.training import TrainSettings
from tests.recipes.helpers import learnable_store, one_thread, tiny_teacher  # noqa: F401 (fixture)


def make_trainer(tmp_path, *, teacher=None, kd=KDSettings(), lora=LoraSettings(r=4, alpha=8, dropout=0.0),
                 store=None, seq_len=64, callbacks=None, student=None, **train):
    settings = dict(batch_size=2, grad_accum=1, max_steps=4, learning_rate=1e-2, warmup_ratio=0.0,
                    lr_scheduler="constant", save_steps=1000, logging_steps=1)
    settings.update(train)
    teacher = teacher if teacher is not None else tiny_teacher()
    torch.manual_seed(1)
    student = student if student is not None else build_student(teacher, "every_other")
    model = attach_lora(student, lora) if lora is not None else student
    ds = PackedDataset(store if store is not None else learnable_store(), seq_len, seed=0)
    args = TrainSettings(**settings).training_arguments(tmp_path / "ckpt", disable_tqdm=True)
    return NeoTrainer(model=model, args=args, train_dataset=ds, data_collator=PackedCollator(), teacher=teacher,
                      kd=kd, callbacks=callbacks)


def reference_loss(student, teacher, batch, kd: KDSettings):
    """(1 - alpha) CE + alpha KD on full logits with torch.nn.functional (forward KL via F.kl_div)."""
    kw = dict(position_ids=batch["position_ids"], use_cache=False)
    s = student(batch["input_ids"], **kw).logits[:, :-1].float()
    with torch.no_grad():
        t = teacher(batch["input_ids"], **kw).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    ce = F.cross_entropy(s[valid], labels[valid])
    log_q = F.log_softmax(s[valid] / kd.temperature, -1)
    log_p = F.log_softmax(t[valid] / kd.temperature, -1)
    if kd.divergence == "forward_kl":
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    else:
        kl = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    return (1 - kd.alpha) * ce + kd.alpha * kl, ce, kl


@pytest.mark.parametrize("kd", [KDSettings(alpha=0.5), KDSettings(alpha=0.9, temperature=2.0),
                                KDSettings(alpha=0.3, divergence="reverse_kl"), KDSettings(alpha=0.0)])
def test_compute_loss_is_the_reference_math_on_packed_rows(tmp_path, kd):
    trainer = make_trainer(tmp_path, kd=kd)
    with torch.no_grad():  # non-zero LoRA B so the adapters matter
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    batch = PackedCollator()(trainer.train_dataset.__getitems__([0, 1]))
    assert (batch["position_ids"] == 0).sum() > 2  # several samples packed per row
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    ref, ce, kl = reference_loss(trainer.model, trainer.teacher, batch, kd)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    expected_kd = kl if kd.alpha > 0 else torch.zeros(())  # alpha = 0: the teacher is not even run
    torch.testing.assert_close(trainer._part_sums, torch.stack([ce, expected_kd]).detach(), rtol=1e-5, atol=1e-5)


def test_no_logits_are_computed(tmp_path):
    trainer = make_trainer(tmp_path)
    seen = {"student": [], "teacher": []}
    trainer.model.get_output_embeddings().register_forward_hook(
        lambda m, a, out: seen["student"].append(tuple(out.shape)))
    trainer.teacher.lm_head.register_forward_hook(lambda m, a, out: seen["teacher"].append(tuple(out.shape)))
    batch = PackedCollator()(trainer.train_dataset.__getitems__([0, 1]))
    trainer.compute_loss(trainer.model, batch).backward()
    # both models are called through their root modules (FSDP hooks run), and both heads project zero positions
    assert seen["teacher"] == [(2, 0, 251)]
    assert seen["student"] == [(2, 0, 251)]


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    big = make_trainer(tmp_path / "a", batch_size=4, grad_accum=1, max_steps=2)
    big.train()
    small = make_trainer(tmp_path / "b", batch_size=2, grad_accum=2, max_steps=2)
    small.train()
    a, b = _lora_state(big.model), _lora_state(small.model)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=2e-5, atol=2e-6, msg=name)
    la = [r["loss"] for r in big.state.log_history if "loss" in r]
    lb = [r["loss"] for r in small.state.log_history if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-5)


def test_training_learns_and_logs_parts(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=20, learning_rate=2e-2, kd=KDSettings(alpha=0.5),
                           lora=LoraSettings(r=8, alpha=16, dropout=0.0),
                           callbacks=[MetricsJsonlCallback(tmp_path / "metrics.jsonl")])
    trainer.train()
    logs = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logs] == list(range(1, 21))
    for r in logs:
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"], rel=1e-4)
    first, last = logs[0]["ce"], sum(r["ce"] for r in logs[-3:]) / 3
    assert last < first - 1.0, (first, last)


def test_full_parameter_training_updates_every_weight(tmp_path):
    trainer = make_trainer(tmp_path, lora=None, max_steps=1, learning_rate=1e-3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert set(changed) == set(before)
    assert not any(p.requires_grad for p in trainer.teacher.parameters())


def test_adapters_save_and_reload(tmp_path):
    from peft import PeftModel

    teacher = tiny_teacher()
    trainer = make_trainer(tmp_path, teacher=teacher, max_steps=3)
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(123)
    reloaded = PeftModel.from_pretrained(build_student(teacher, "every_other"), tmp_path / "adapter").eval()
    ids = torch.randint(0, 251, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trainer.model.eval()(ids).logits)
        assert not torch.allclose(reloaded(ids).logits, build_student(teacher, "every_other")(ids).logits)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    lora = LoraSettings(r=4, alpha=8, dropout=0.1)  # dropout: the RNG state must be restored too
    full = make_trainer(tmp_path / "full", lora=lora, max_steps=6, save_steps=3, grad_accum=2)
    full.train()
    checkpoint = tmp_path / "full" / "ckpt" / "checkpoint-3"
    assert (checkpoint / "trainer_state.json").is_file() and last_checkpoint(tmp_path / "full" / "ckpt").name == \
        "checkpoint-6"
    assert not list((tmp_path / "full" / "ckpt").glob(".staging-*"))

    resumed = make_trainer(tmp_path / "resumed", lora=lora, max_steps=6, save_steps=3, grad_accum=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = _lora_state(full.model), _lora_state(resumed.model)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = {r["step"]: r["loss"] for r in full.state.log_history if "loss" in r}
    again = {r["step"]: r["loss"] for r in resumed.state.log_history if "loss" in r}
    assert {s: losses[s] for s in (4, 5, 6)} == {s: again[s] for s in (4, 5, 6)}


def test_interrupt_saves_a_checkpoint_and_stops(tmp_path):
    import os
    import signal

    from transformers import TrainerCallback

    from tellneo.recipes.training import run_training

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / a background job

    class SendSigint(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[SendSigint()])
    _, interrupted = run_training(trainer, None)
    assert interrupted and trainer.state.global_step == 3
    assert last_checkpoint(tmp_path / "ckpt").name == "checkpoint-3"
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    state = json.loads((tmp_path / "ckpt" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_bf16_autocast_and_gradient_checkpointing(tmp_path):
    plain = make_trainer(tmp_path / "a", max_steps=1)
    batch = PackedCollator()(plain.train_dataset.__getitems__([0, 1]))
    ref = plain.compute_loss(plain.model, dict(batch)).item()
    trainer = make_trainer(tmp_path / "b", max_steps=2, bf16=True, gradient_checkpointing=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.compute_loss(trainer.model, dict(batch))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref, rel=3e-2)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.state.log_history if "loss" in r)


def test_kd_without_teacher_is_refused(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.teacher = None
    batch = PackedCollator()(trainer.train_dataset.__getitems__([0, 1]))
    with pytest.raises(ValueError, match="needs a teacher"):
        trainer.compute_loss(trainer.model, batch)


def _trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_nan_loss_stops_before_its_update_and_keeps_the_last_good_checkpoint(tmp_path):
    import signal

    from transformers import TrainerCallback

    from tellneo.recipes.trainer_utils import NonFiniteError
    from tellneo.recipes.training import run_training

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / a background job

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                self.after_step_2 = _trainable_state(model)

    snap = Snapshot()
    trainer = make_trainer(tmp_path, max_steps=4, save_steps=2, callbacks=[snap])
    compute = trainer.compute_loss

    def nan_at_step_3(model, inputs, *a, **kw):
        loss = compute(model, inputs, *a, **kw)
        return loss * float("nan") if trainer.state.global_step == 2 else loss

    trainer.compute_loss = nan_at_step_3
    with pytest.raises(NonFiniteError, match=r"non-finite loss nan at step 3; training stopped before applying that "
                                             r"step, and the last good checkpoint is .*checkpoint-2: "):
        run_training(trainer, None)
    assert signal.getsignal(signal.SIGINT) is before  # restored despite the error
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint-2"]
    now = _trainable_state(trainer.model)
    assert now.keys() == snap.after_step_2.keys() and all(torch.equal(now[k], snap.after_step_2[k]) for k in now)


def test_a_nan_gradient_with_a_finite_loss_stops_at_once(tmp_path):
    from tellneo.recipes.trainer_utils import NonFiniteError

    trainer = make_trainer(tmp_path, max_steps=3, grad_accum=2)
    param = next(p for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_B" in n)
    param.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = _trainable_state(trainer.model)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm inf \(loss [0-9.]+\) at step 1; .* no "
                                             "checkpoint was saved before it"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in _trainable_state(trainer.model).items())


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    from transformers import TrainerCallback

    from tellneo.recipes.trainer_utils import NonFiniteError

    class Overflow(TrainerCallback):  # what an update that overflows leaves behind
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 4:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("inf"))

    trainer = make_trainer(tmp_path, max_steps=6, save_steps=2, callbacks=[Overflow()])
    with pytest.raises(NonFiniteError, match=r"the update of step 4 made 1 trainable weight tensor\(s\) non-finite "
                                             r"\(first: .*lora_A.*\); that checkpoint was not saved, and the last "
                                             "good checkpoint is .*checkpoint-2"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint-2"]
