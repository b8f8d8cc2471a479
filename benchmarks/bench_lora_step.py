"""Benchmark: one whole SmolLM2-135M-Instruct LoRA training step, tellneo-patched vs plain PEFT.

LoRA r 16 (alpha 32) on all linear layers, 4 x 256 tokens, lora_dropout 0.1 (the target case) and 0.0; a step is
zero_grad + forward + loss + backward + AdamW step on the LoRA parameters. Each (case, impl) runs in a fresh
process that loads the embedded model offline; time_ms is the median over repeated steps after warm-up, peak_mb
the growth of peak RSS during the first step (activations, gradients and AdamW state). load1 records the
1-minute load average, since the benchmark machine is shared. Target on CPU: <= 1.0x PEFT's step time and
<= 0.9x its peak memory.

    python -m benchmarks.bench_lora_step [--device cpu|cuda] [--dropout 0.1 0.0] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from benchmarks import add_out_flag, add_threads_flag, require_device, write_results

SUITE = "lora_step"
BASELINE = "peft"


def build_step(impl: str, dropout: float = 0.1, r: int = 16, alpha: float = 32.0, batch: int = 4, seq: int = 256,
               device: str = "cpu", dtype: str = "float32", probe_saved: bool = False):
    """Returns (one training step, extra columns) for ``impl`` in {"peft", "tellneo"}.

    ``probe_saved``: instead, measure the activation memory autograd saves in one forward (unique storages,
    parameters excluded) and return a no-op callable; run as its own job so its freed memory cannot hide the
    measured step's peak RSS.
    """
    from peft import LoraConfig, get_peft_model

    from tellneo.models import load_causal_lm

    model, _ = load_causal_lm(dtype=getattr(torch, dtype))
    model = get_peft_model(
        model.to(device), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear")
    )
    model.train()
    n_patched = 0
    if impl == "tellneo":
        from tellneo.integrations.peft import patch

        report = patch(model)
        assert not report.skipped, report.summary()
        n_patched = len(report)
    elif impl != "peft":
        raise ValueError(f"unknown impl {impl!r}")
    torch.manual_seed(0)
    vocab = model.base_model.model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())

    if probe_saved:
        from benchmarks.bench_lora_linear import saved_activation_mb

        saved = saved_activation_mb(lambda: model(input_ids=ids, labels=ids).loss, list(model.parameters()))
        return (lambda: None), {"saved_mb": round(saved, 1)}
    extra = {"tokens": batch * seq, "rank": r, "dropout": dropout, "lora_layers_patched": n_patched,
             "trainable_params": sum(p.numel() for p in params), "threads": torch.get_num_threads()}
    return step, extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_lora_step",
        description="SmolLM2-135M LoRA (all linear, r 16) training step: tellneo-patched vs PEFT.",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.1, 0.0], help="lora_dropout values")
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps before timing (the first is the peak-memory one)")
    parser.add_argument("--interleaved", type=int, default=6, metavar="STEPS",
                        help="also time both impls alternating in one process for STEPS rounds (0: skip); fairer "
                             "ratios on a shared machine")
    add_threads_flag(parser)
    add_out_flag(parser)
    args = parser.parse_args(argv)

    from tellneo.bench import Job, Row, add_ratios, device_name, measure

    require_device(parser, args.device)
    dev_name = device_name(args.device)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    rows = []
    for p in args.dropout:
        case = f"smollm2-135m r16 4x256 p{p}"
        inter = {}
        if args.interleaved:
            from benchmarks.bench_lora_linear import interleaved_medians

            jobs = {impl: Job("benchmarks.bench_lora_step:build_step",
                              dict(impl=impl, dropout=p, device=args.device, dtype=dtype))
                    for impl in ("peft", "tellneo")}
            inter = interleaved_medians(jobs, args.device, warmup=1, repeat=args.interleaved, threads=args.threads)
            print(f"{case:30s} interleaved medians: " + ", ".join(f"{k} {v:.1f} ms" for k, v in inter.items()))
        for impl in ("peft", "tellneo"):
            kwargs = dict(impl=impl, dropout=p, device=args.device, dtype=dtype)
            probe = measure(Job("benchmarks.bench_lora_step:build_step", dict(kwargs, probe_saved=True)), args.device,
                            warmup=0, repeat=1, threads=args.threads)
            load = os.getloadavg()[0]
            m = measure(Job("benchmarks.bench_lora_step:build_step", kwargs), args.device, warmup=args.warmup,
                        repeat=args.repeat, threads=args.threads)
            extra = dict(m.extra, saved_mb=probe.extra["saved_mb"], load1=round(load, 2),
                         load1_after=round(os.getloadavg()[0], 2))
            if inter:
                extra.update(time_ms_interleaved=round(inter[impl], 1),
                             ratio_time_interleaved=round(inter[impl] / inter[BASELINE], 4))
            rows.append(Row(SUITE, case, impl, dev_name, dtype, "batch=4 seq=256 r=16 all-linear", m.time_ms,
                            m.peak_mb, extra))
            print(f"{case:30s} {impl:8s} {m.time_ms:10.1f} ms  peak {m.peak_mb:8.1f} MB  "
                  f"saved {extra['saved_mb']:8.1f} MB  load {load:.2f}", flush=True)
    records = add_ratios(rows, BASELINE)
    write_results(records, args.device, args.out, SUITE, "SmolLM2-135M LoRA training step: tellneo vs PEFT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
