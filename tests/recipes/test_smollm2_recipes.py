"""The recipes on the embedded SmolLM2-135M-Instruct (a few CPU steps): the layer-dropped student learns from the
teacher, and the loss matches the plain full-logits computation on the real vocabulary."""

from __future__ import annotations

import pytest
import torch

from tellneo.data import PackedCollator, PackedDataset
from tellneo.recipes.common import LoraSettings, attach_lora
from tellneo.recipes.evaluate import distill_metrics, eval_batches
from tellneo.recipes.neo import KDSettings, NeoTrainer, build_student, check_compatible
from tellneo.recipes.records import tokenize
from tellneo.recipes.training import TrainSettings
from tests.recipes.helpers import one_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def docs_rows(smollm2):
    from tellneo.data.corpora import pydoc_topic_pairs

    _, tokenizer = smollm2
    store = tokenize(pydoc_topic_pairs()[:12], tokenizer, what="test", vocab_size=len(tokenizer), max_tokens=256)
    return PackedDataset(store, 256, shuffle=False, pad_id=tokenizer.pad_token_id)


def test_neo_on_smollm2_learns_and_matches_the_plain_loss(smollm2, docs_rows, tmp_path):
    teacher, tokenizer = smollm2  # shared session fixture: only read, never modified
    student = build_student(teacher, "every_other")
    assert student.config.num_hidden_layers == 15 and teacher.config.num_hidden_layers == 30
    check_compatible(teacher, student, tokenizer, tokenizer)
    torch.manual_seed(0)
    model = attach_lora(student, LoraSettings(r=8, alpha=16, dropout=0.0))
    assert len(model.tellneo_patch_report.patched) == 15 * 7

    rows = list(range(min(2, len(docs_rows))))
    batch = PackedCollator()(docs_rows.__getitems__(rows))
    args = TrainSettings(batch_size=2, max_steps=3, learning_rate=2e-3, lr_scheduler="constant", warmup_ratio=0.0,
                         save_steps=1000).training_arguments(tmp_path, save_strategy="no", disable_tqdm=True)
    fixed = torch.utils.data.Subset(docs_rows, rows * 3)  # the same two rows in every step
    trainer = NeoTrainer(model=model, args=args, train_dataset=fixed, data_collator=PackedCollator(),
                         teacher=teacher, kd=KDSettings(alpha=0.5))

    # the fused loss equals 0.5 CE + 0.5 KL computed from both models' full logits
    with torch.no_grad():
        fused = trainer.compute_loss(model, dict(batch)).item()
        kw = dict(position_ids=batch["position_ids"], use_cache=False)
        s = model(batch["input_ids"], **kw).logits[:, :-1]
        t = teacher(batch["input_ids"], **kw).logits[:, :-1]
        lab = batch["labels"][:, 1:]
        v = lab != -100
        ce = torch.nn.functional.cross_entropy(s[v], lab[v])
        kl = torch.nn.functional.kl_div(s[v].log_softmax(-1), t[v].log_softmax(-1), log_target=True,
                                        reduction="batchmean")
    assert fused == pytest.approx((0.5 * ce + 0.5 * kl).item(), rel=1e-4)

    before = distill_metrics(model, eval_batches(docs_rows, 2), teacher=teacher)
    trainer.train()
    after = distill_metrics(model, eval_batches(docs_rows, 2), teacher=teacher)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert after["ce"] < before["ce"] and after["kl"] < before["kl"]
    assert after["top1_agreement"] > before["top1_agreement"]
    assert before["teacher_ce"] < 4.0  # the teacher itself is a sensible model of this text
