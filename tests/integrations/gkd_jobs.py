"""Tiny GKD setups shared by test_trl_gkd.py and its peak-memory jobs (importable by tellneo.bench.measure_here)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def word_tokenizer(vocab: int = 251):
    """A word-level tokenizer over a tiny vocabulary (t0 = pad, t1 = eos), for trainers that need one."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2")


def tiny_pair(vocab: int = 251, hidden: int = 64, seed: int = 0):
    """(student 2 layers, teacher 3 layers) random Llamas over one vocabulary, logits scaled up (std ~ 3)."""
    models = []
    for layers, s in ((2, seed), (3, seed + 7)):
        torch.manual_seed(s)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden + hidden // 2,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
        m = LlamaForCausalLM(cfg)
        with torch.no_grad():
            m.lm_head.weight.normal_(0, 3.0 / hidden**0.5)
        models.append(m)
    return models[0], models[1]


class Rows(torch.utils.data.Dataset):
    """Token rows with a prompt (not trained) and ragged completions (right padding, labels -100 there)."""

    def __init__(self, n: int = 8, t: int = 14, vocab: int = 251, seed: int = 5):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, vocab, (n, t), generator=g)
        self.mask = torch.ones_like(self.ids)
        self.labels = self.ids.clone()
        self.labels[:, :4] = -100
        for i in range(n):
            pad = i % 4
            if pad:
                self.ids[i, t - pad:] = 0
                self.mask[i, t - pad:] = 0
                self.labels[i, t - pad:] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def as_dataset(rows: Rows):
    """The rows as a ``datasets.Dataset`` of int lists (what TRL's trainers accept)."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": rows.ids.tolist(), "attention_mask": rows.mask.tolist(),
                              "labels": rows.labels.tolist()})


def collate(rows: list[dict]) -> dict:
    return {k: torch.as_tensor([list(r[k]) for r in rows]) for k in rows[0]}


def make_trainer(fused: bool, output_dir: str, *, vocab: int = 251, hidden: int = 64, beta: float = 0.5,
                 steps: int = 2, grad_accum: int = 2, rows: int = 8, seq: int = 14, batch: int = 2):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from tellneo.integrations.trl import FusedGKDTrainer

    student, teacher = tiny_pair(vocab, hidden)
    args = GKDConfig(output_dir=output_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=grad_accum,
                     max_steps=steps, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
                     report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, lmbda=0.0,
                     seq_kd=False, beta=beta, bf16=False, max_length=None)
    cls = FusedGKDTrainer if fused else GKDTrainer
    return cls(model=student, teacher_model=teacher, args=args, train_dataset=as_dataset(Rows(rows, seq, vocab)),
               data_collator=collate, processing_class=word_tokenizer(vocab))


def loss_step(fused: bool, output_dir: str, vocab: int, hidden: int, seq: int, batch: int):
    """Builder for tellneo.bench.measure_here: one compute_loss + backward at a vocab-heavy shape."""
    trainer = make_trainer(fused, output_dir, vocab=vocab, hidden=hidden, rows=batch, seq=seq, batch=batch)
    inputs = collate([trainer.train_dataset[i] for i in range(batch)])
    model = trainer.model.train()

    def run():
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(inputs))
        loss.backward()
        return float(loss.detach())

    return run
