"""One NEO training step on the embedded SmolLM2-135M-Instruct: tellneo vs the plain path users write today.

    python -m benchmarks.bench_neo_step [--quick] [--batch 2] [--seq-len 512] [--dropout 0.0] [--threads N]

Teacher: SmolLM2-135M-Instruct (30 layers); student: every other layer (15), LoRA r16 / alpha 32 on all linear
layers; the same packed batch of instruction data (pairs from Python's documentation, response tokens trained);
loss ``0.5 CE + 0.5 KL(teacher || student)``; one step = forward of both models, backward, AdamW step.

Implementations (each measured in a fresh process; see tellneo.bench):

* ``plain`` — what a user writes today: PEFT LoRA, ``student(...).logits`` and ``teacher(...).logits`` (full
  ``[B, T, V]`` logits of both models), ``F.cross_entropy`` + ``F.kl_div`` on the shifted tokens;
* ``tellneo-kd`` — :class:`tellneo.recipes.neo.NeoTrainer`'s loss (hidden states only, fused KD) with PEFT's
  own LoRA forward;
* ``tellneo`` — the same with tellneo's fused LoRA (``tellneo.integrations.peft.patch``): the full recipe.

Writes ``benchmarks/results/neo_step.csv`` (+ PNG); ``--quick`` uses batch 1 x 256 tokens and 2 repeats. CPU time
depends heavily on what else runs on the machine: the load average before and after is written into the CSV.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from benchmarks import add_out_flag, add_threads_flag, write_results
from tellneo.bench import Job, Row, add_ratios, device_name, measure

SUITE = "neo_step"
IMPLS = ("plain", "tellneo-kd", "tellneo")


def _batch(batch: int, seq_len: int) -> dict[str, Any]:
    from tellneo.data import PackedDataset
    from tellneo.data.corpora import python_docs_pairs
    from tellneo.models import load_causal_lm
    from tellneo.recipes.records import tokenize

    _, tokenizer = load_causal_lm(None, tokenizer_only=True)
    store = tokenize(python_docs_pairs()[:200], tokenizer, what="benchmark", vocab_size=len(tokenizer),
                     max_tokens=seq_len)
    ds = PackedDataset(store, seq_len, seed=0, shuffle=True)
    out = ds.batch(list(range(batch)))
    return {k: out[k] for k in ("input_ids", "labels", "position_ids")}


# Random Llama teachers for the GPU campaign (no hub downloads): the student keeps every other layer, so the
# teacher is 2x deeper than the student. "llama-1b": a Llama-3.2-1B-shaped student (hidden 2048, 16 layers,
# vocab 128256) under a 32-layer teacher of the same width; "llama-tiny": the same recipe at test size.
RANDOM_LLAMAS: dict[str, dict[str, Any]] = {
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     tie_word_embeddings=False),
    "llama-tiny": dict(vocab_size=251, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False),
}


def _random_teacher(model: str, device: str, dtype: Any):
    """A randomly initialised Llama teacher of the preset ``model``, created directly on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if model not in RANDOM_LLAMAS:
        raise ValueError(f"model must be 'smollm2' or one of {sorted(RANDOM_LLAMAS)}, got {model!r}")
    with torch.device(device):
        return LlamaForCausalLM(LlamaConfig(**RANDOM_LLAMAS[model])).to(dtype)


def _random_batch(batch: int, seq_len: int, vocab: int, device: str) -> dict[str, Any]:
    """Random tokens, the first quarter of every row untrained (a prompt), one position id run per row."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g, device=device)
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100
    pos = torch.arange(seq_len, device=device).expand(batch, seq_len).contiguous()
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def job_step(impl: str, batch: int, seq_len: int, dropout: float, device: str = "cpu", model: str = "smollm2",
             dtype: str = "float32"):
    """Build teacher, student, LoRA and the batch; return a callable running one training step.

    ``model``: "smollm2" (the embedded SmolLM2-135M-Instruct and a packed batch of real instruction data) or a
    random Llama preset of :data:`RANDOM_LLAMAS` (random tokens; no tokenizer needed). ``dtype``: the dtype of
    both models and the adapters.
    """
    import torch
    import torch.nn.functional as F

    from tellneo.models import load_causal_lm
    from tellneo.recipes.common import LoraSettings, attach_lora
    from tellneo.recipes.neo import KDSettings, NeoTrainer, build_student
    from tellneo.recipes.training import TrainSettings

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    if model == "smollm2":
        teacher, _ = load_causal_lm(None, dtype=dt)
        teacher = teacher.to(device)
        inputs = {k: v.to(device) for k, v in _batch(batch, seq_len).items()}
    else:
        teacher = _random_teacher(model, device, dt)
        inputs = _random_batch(batch, seq_len, teacher.config.vocab_size, device)
    teacher = teacher.eval().requires_grad_(False)
    with torch.device(device):  # the student's layers are created where the teacher's weights are
        student = build_student(teacher, "every_other")
    student = attach_lora(student, LoraSettings(r=16, alpha=32, dropout=dropout, patch=impl == "tellneo"))
    student = student.to(device=device, dtype=dt).train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    n_items = int((inputs["labels"][:, 1:] != -100).sum())

    if impl == "plain":
        def loss_fn():
            kw = dict(position_ids=inputs["position_ids"], use_cache=False)
            s = student(inputs["input_ids"], **kw).logits[:, :-1]
            with torch.no_grad():
                t = teacher(inputs["input_ids"], **kw).logits[:, :-1]
            labels = inputs["labels"][:, 1:]
            valid = labels != -100
            ce = F.cross_entropy(s[valid].float(), labels[valid])
            kd = F.kl_div(F.log_softmax(s[valid].float(), -1), F.log_softmax(t[valid].float(), -1), log_target=True,
                          reduction="batchmean")
            return 0.5 * ce + 0.5 * kd
    else:
        args = TrainSettings(max_steps=1).training_arguments(f"/tmp/tellneo-bench-{os.getpid()}", save_strategy="no")
        trainer = NeoTrainer(model=student, args=args, teacher=teacher, kd=KDSettings(alpha=0.5))

        def loss_fn():
            return trainer.compute_loss(student, dict(inputs), num_items_in_batch=n_items)

    def step():
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return float(loss)

    report = getattr(student, "tellneo_patch_report", None)
    return step, {"trained_tokens": n_items, "fused_lora_layers": len(report) if report is not None else 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 1 x 256 tokens, 2 repeats (smoke run)")
    parser.add_argument("--batch", type=int, default=2, help="packed rows per step")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (NEO uses 0)")
    parser.add_argument("--repeat", type=int, default=3, help="timed steps (median reported)")
    add_threads_flag(parser)
    parser.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS), help="implementations to run")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda")
    add_out_flag(parser)
    args = parser.parse_args(argv)
    batch, seq_len, repeat = (1, 256, 2) if args.quick else (args.batch, args.seq_len, args.repeat)
    case = f"B{batch}xT{seq_len}_dropout{args.dropout:g}"
    load_before = os.getloadavg()[0]
    rows = []
    for impl in args.impl:
        print(f"[neo_step] {case} {impl} ...", flush=True)
        m = measure(Job("benchmarks.bench_neo_step:job_step",
                        dict(impl=impl, batch=batch, seq_len=seq_len, dropout=args.dropout, device=args.device)),
                    args.device, warmup=1, repeat=repeat, threads=args.threads)
        print(f"  {m.time_ms / 1e3:.2f} s/step, peak +{m.peak_mb:.0f} MB", flush=True)
        rows.append(Row(SUITE, case, impl, device_name(args.device), "float32",
                        f"B={batch},T={seq_len},V=49152,teacher 30 layers,student 15,LoRA r16", m.time_ms, m.peak_mb,
                        m.extra))
    load_after = os.getloadavg()[0]
    records = add_ratios(rows, "plain")
    for r in records:
        r.update(load_avg_before=round(load_before, 2), load_avg_after=round(load_after, 2),
                 threads=args.threads or "default", cpu_cores=os.cpu_count())
    for r in records:
        print(f"  {r['impl']:>10}: {r['time_ms'] / 1e3:7.2f} s  {r['peak_mb']:8.0f} MB  time x{r['ratio_time']}  "
              f"memory x{r['ratio_mem']}")
    print(f"  load average {load_before:.2f} before, {load_after:.2f} after")
    write_results(records, args.device, args.out, SUITE,
                  "one NEO training step (SmolLM2-135M teacher, 15-layer LoRA student)")
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
