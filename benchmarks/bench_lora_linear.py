"""Benchmark: one LoRA linear layer, forward + backward, tellneo's fused op vs PEFT (and the frozen base linear).

CPU (default): every LoRA-wrapped linear shape of SmolLM2-135M (hidden 576, intermediate 1536, 9 query heads x 64,
3 key/value heads x 64) at 4 x 256 tokens, float32, r 16, alpha 16, dropout 0 and 0.1. Each (case, impl) runs in
a fresh process; peak_mb is the growth of peak RSS during the first forward+backward. The extra column saved_mb
is the activation memory the layer keeps for its backward (unique storages saved by autograd, parameters
excluded), measured exactly with saved-tensor hooks; load1 is the 1-minute load average when the case ran (the
benchmark machine is shared).

GPU (``--device cuda``): d in {4096, 5120, 8192} square and Llama MLP shapes (4096->14336, 14336->4096,
5120->13824, 13824->5120), r 16, alpha 16, bf16, 2048-8192 tokens, dropout 0 and 0.1, vs PEFT eager,
PEFT + torch.compile and the frozen base linear. Results go to benchmarks/results/gpu/.

    python -m benchmarks.bench_lora_linear [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from benchmarks import add_out_flag, add_threads_flag, require_device, write_results

SUITE = "lora_linear"
BASELINE = "peft"

# (case name, in_features, out_features)
SMOLLM2_SHAPES = [
    ("q_proj/o_proj", 576, 576),
    ("k_proj/v_proj", 576, 192),
    ("gate_proj/up_proj", 576, 1536),
    ("down_proj", 1536, 576),
]
GPU_SHAPES = [
    ("square 4096", 4096, 4096),
    ("square 5120", 5120, 5120),
    ("square 8192", 8192, 8192),
    ("llama3-8b up/gate", 4096, 14336),
    ("llama3-8b down", 14336, 4096),
    ("llama2-13b up/gate", 5120, 13824),
    ("llama2-13b down", 13824, 5120),
]
GPU_TOKENS = [2048, 8192]


def _lora_layer(d_in: int, d_out: int, r: int, alpha: float, p: float, dtype: torch.dtype, device: str):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    base = torch.nn.Linear(d_in, d_out, bias=False)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p)
    layer = LoraLinear(base, "default", cfg, r=r, lora_alpha=alpha, lora_dropout=p)
    with torch.no_grad():  # non-zero B so the benchmark is not a special case
        layer.lora_B["default"].weight.normal_(0, 0.02)
    layer.base_layer.weight.requires_grad_(False)
    return layer.to(device=device, dtype=dtype).train()


def saved_activation_mb(fn, params) -> float:
    """MB of unique storages autograd saves during ``fn()`` (parameters excluded)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def build_layer_case(impl: str, d_in: int, d_out: int, tokens: int, r: int = 16, alpha: float = 16.0,
                     p: float = 0.0, dtype: str = "float32", device: str = "cpu", batch: int = 4,
                     probe_saved: bool = False, backend: str = "auto"):
    """Returns (fwd+bwd callable, extra columns) for one implementation of one layer shape.

    ``backend``: the fused op's backend for ``impl="tellneo"`` ("triton" forces the Triton kernels, which on CPU
    tensors need TRITON_INTERPRET=1).

    ``probe_saved``: instead, measure the activation memory saved for backward and return a no-op callable (run
    as a separate job, so that the probe's freed memory cannot hide the measured call's peak RSS).
    """
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    layer = _lora_layer(d_in, d_out, r, alpha, p, dt, device)
    if impl == "base-linear":
        module = layer.base_layer
    elif impl == "peft":
        module = layer
    elif impl == "peft+compile":
        module = torch.compile(layer)
    elif impl == "tellneo":
        from tellneo.integrations.peft import patch

        report = patch(layer, backend=backend)
        assert len(report) == 1, report.summary()
        module = layer
    else:
        raise ValueError(f"unknown impl {impl!r}")
    x = torch.randn(batch, tokens // batch, d_in, device=device, dtype=dt, requires_grad=True)
    dy = torch.randn(batch, tokens // batch, d_out, device=device, dtype=dt)
    params = list(layer.parameters())
    trainable = [q for q in params if q.requires_grad]

    def step():
        x.grad = None
        for q in trainable:
            q.grad = None
        module(x).backward(dy)

    if probe_saved:
        return (lambda: None), {"saved_mb": round(saved_activation_mb(lambda: module(x), params), 3)}
    if impl == "peft+compile":
        step()  # compile outside the measured calls (and outside the memory measurement)
    return step, {"tokens": tokens, "rank": r, "dropout": p, "threads": torch.get_num_threads()}


def interleaved_medians(jobs: dict, device: str, warmup: int, repeat: int, threads: int | None = None
                        ) -> dict[str, float]:
    """Median ms per impl with the impls' calls alternated in one process (rotating order each round), so that
    a shared machine's changing load hits every impl alike. Complements the isolated per-impl measurements.
    On CPU this runs in a fresh spawned process (nothing stays allocated in the caller)."""
    if not device.startswith("cuda"):
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(1) as pool:
            return pool.apply(_interleaved_here, (jobs, device, warmup, repeat, threads))
    return _interleaved_here(jobs, device, warmup, repeat, threads)


def _interleaved_here(jobs: dict, device: str, warmup: int, repeat: int, threads: int | None = None
                      ) -> dict[str, float]:
    import statistics

    from tellneo.bench import time_call

    if threads:
        torch.set_num_threads(threads)
    fns = {name: job.build()[0] for name, job in jobs.items()}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeat):
        for name in names[i % len(names):] + names[: i % len(names)]:
            times[name].append(time_call(fns[name], device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def cases(device: str, quick: bool):
    if device.startswith("cuda"):
        impls = ["peft", "peft+compile", "base-linear", "tellneo"]
        for name, d_in, d_out in GPU_SHAPES[: 2 if quick else None]:
            for tokens in GPU_TOKENS[: 1 if quick else None]:
                for p in (0.0, 0.1):
                    yield f"{name} T{tokens} p{p}", d_in, d_out, tokens, p, "bfloat16", impls
    else:
        impls = ["peft", "base-linear", "tellneo"]
        for name, d_in, d_out in SMOLLM2_SHAPES[: 1 if quick else None]:
            for p in (0.0, 0.1):
                yield f"{name} p{p}", d_in, d_out, 1024, p, "float32", impls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_lora_linear",
        description="LoRA linear layer forward+backward: tellneo fused op vs PEFT (CSV + PNG in benchmarks/results).",
    )
    parser.add_argument("--device", default="cpu", help="cpu (SmolLM2 shapes, fp32) or cuda (large bf16 shapes)")
    parser.add_argument("--quick", action="store_true", help="one shape only (smoke test of the script)")
    parser.add_argument("--repeat", type=int, default=7, help="timed repetitions per case (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    add_threads_flag(parser)
    add_out_flag(parser)
    args = parser.parse_args(argv)

    from tellneo.bench import Job, Row, add_ratios, device_name, measure

    require_device(parser, args.device)
    dev_name = device_name(args.device)
    rows = []
    for case, d_in, d_out, tokens, p, dtype, impls in cases(args.device, args.quick):
        # dropout does not apply to the frozen base alone; its p0 row is the floor
        impls = [i for i in impls if not (i == "base-linear" and p > 0)]
        jobs = {impl: Job("benchmarks.bench_lora_linear:build_layer_case",
                          dict(impl=impl, d_in=d_in, d_out=d_out, tokens=tokens, p=p, dtype=dtype, device=args.device))
                for impl in impls}
        inter = interleaved_medians(jobs, args.device, args.warmup, args.repeat * 3, args.threads)
        case_rows = []
        for impl in impls:
            kwargs = dict(impl=impl, d_in=d_in, d_out=d_out, tokens=tokens, p=p, dtype=dtype, device=args.device)
            probe = measure(Job("benchmarks.bench_lora_linear:build_layer_case", dict(kwargs, probe_saved=True)),
                            args.device, warmup=0, repeat=1, threads=args.threads)
            load = os.getloadavg()[0]
            m = measure(Job("benchmarks.bench_lora_linear:build_layer_case", kwargs), args.device,
                        warmup=args.warmup, repeat=args.repeat, threads=args.threads)
            extra = dict(m.extra, saved_mb=probe.extra["saved_mb"], load1=round(load, 2),
                         time_ms_interleaved=round(inter[impl], 4),
                         ratio_time_interleaved=round(inter[impl] / inter[BASELINE], 4))
            case_rows.append(Row(SUITE, case, impl, dev_name, dtype, f"N={tokens} in={d_in} out={d_out} r=16",
                                 m.time_ms, m.peak_mb, extra))
            print(f"{case:28s} {impl:14s} {m.time_ms:9.2f} ms (interleaved {inter[impl]:9.2f} ms)  "
                  f"peak {m.peak_mb:8.1f} MB  saved {extra['saved_mb']:7.1f} MB  load {load:.2f}", flush=True)
        rows += case_rows
    records = add_ratios(rows, BASELINE)
    write_results(records, args.device, args.out, SUITE, "LoRA linear fwd+bwd: tellneo vs PEFT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
