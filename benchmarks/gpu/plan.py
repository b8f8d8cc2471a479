"""What the GPU campaign measures, in priority order, and how long each measurement is expected to take.

Every benchmark stage is a list of :class:`Cell` s, one (case, impl) each, built from the existing suites' job
builders (``benchmarks/bench_*.py``), so the campaign measures exactly what those suites measure. The shapes are
the issue's: Liger's own fused-JSD benchmark shape for KD, d in {4096, 8192} for LoRA, a 1B-class Llama for the
NEO step. ``dry_run=True`` gives the same cells at test size on the CPU (Triton under ``TRITON_INTERPRET=1``).

Time estimates (seconds per cell) come from the shapes and a stated machine model (:data:`GPU_MODEL`,
:data:`CPU_MODEL`): ``build + calls x max(flops / flop_rate, bytes / bandwidth) + compile``. They are
assumptions for budgeting, not measurements; ``campaign.json`` records each cell's estimate beside its real
elapsed time so the model can be checked against the first real run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tellneo.bench import Job


@dataclass(frozen=True)
class MachineModel:
    """Assumed throughput of the measuring machine (see module docstring)."""

    flop_rate: float  # effective dense matmul FLOP/s in the benchmark dtype
    fp32_flop_rate: float  # the same for the float32 reference of the gradient-error check
    bandwidth: float  # effective memory bytes/s
    call_overhead_s: float  # launches / Python per call
    build_s: float  # per cell: inputs, CUDA context, modules
    compile_s: float  # first call of a torch.compile'd impl (inductor)
    model_build_s: float  # per NEO cell: random teacher + student + PEFT + trainer


# H100/H200 SXM: ~990 TFLOP/s dense bf16 peak, 3.35 / 4.8 TB/s HBM; assume ~30% and ~50% of those.
GPU_MODEL = MachineModel(flop_rate=300e12, fp32_flop_rate=40e12, bandwidth=2.0e12, call_overhead_s=0.005,
                         build_s=1.5, compile_s=45.0, model_build_s=20.0)
# The 2-core CPU of the dry run; torch.compile is disabled there (TORCHDYNAMO_DISABLE=1) and Triton interpreted.
CPU_MODEL = MachineModel(flop_rate=5e9, fp32_flop_rate=5e9, bandwidth=2e9, call_overhead_s=0.3, build_s=0.5,
                         compile_s=0.0, model_build_s=6.0)


@dataclass(frozen=True)
class Cell:
    """One measured (case, impl) of a stage."""

    case: str
    impl: str
    job: Job
    dtype: str
    shape: str
    estimate_s: float
    warmup: int = 1
    repeat: int = 3
    needs_cuda: bool = False  # skipped (with that reason) where no CUDA device is visible
    needs_module: str | None = None  # a peer: skipped (with that reason) where it cannot be imported
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchStage:
    """A benchmark stage: its cells, the baseline impl of the ratios and the CSV it writes into --out."""

    name: str
    title: str
    suite: str
    baseline: str
    cells: list[Cell]
    device: str

    @property
    def csv_name(self) -> str:
        return f"{self.suite}.csv"

    @property
    def estimate_s(self) -> float:
        return sum(c.estimate_s for c in self.cells)


def _cell_s(m: MachineModel, calls: int, flops: float, nbytes: float, *, compiles: int = 0,
            extra_s: float = 0.0, build_s: float | None = None) -> float:
    """``compiles``: 0 (eager), 1 (the stage's first torch.compile) or 2 (a later shape: recompiles, assumed
    at half the cost as the compiler is warm)."""
    per_call = max(flops / m.flop_rate, nbytes / m.bandwidth) + m.call_overhead_s
    compile_s = {0: 0.0, 1: m.compile_s, 2: m.compile_s / 2}[compiles]
    return round((m.build_s if build_s is None else build_s) + calls * per_call + compile_s + extra_s, 1)


def _compiles(impl: str, seen: list[str]) -> int:
    if not impl.endswith("compile"):
        return 0
    seen.append(impl)
    return 1 if seen.count(impl) == 1 else 2


def _eager_first(cells: list[Cell]) -> list[Cell]:
    """Compiled impls after the eager ones (stable): a short budget keeps every shape's eager comparison."""
    return sorted(cells, key=lambda c: c.impl.endswith("compile"))


def _calls(warmup: int, repeat: int, pre_steps: int = 0) -> int:
    return 1 + max(0, warmup - 1) + repeat + pre_steps  # memory call + warm-up + timed (+ builder's own steps)


# ------------------------------------------------------------------------------------------------ KD / CE
KD_IMPLS = ["tellneo-triton", "liger+compile", "liger", "torch-full"]
CE_IMPLS = ["tellneo-triton", "cut-cross-entropy", "torch-full"]
PEER_MODULE = {"liger": "liger_kernel", "liger+compile": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy"}


def _kd_cells(dry_run: bool, ce_only: bool) -> list[Cell]:
    m = CPU_MODEL if dry_run else GPU_MODEL
    device, dtype = ("cpu", "float32") if dry_run else ("cuda", "bfloat16")
    if dry_run:
        shapes = [("tiny", 16, 16, 24, 200)]  # the Triton interpreter takes seconds per call even at this size
    elif ce_only:
        shapes = [(f"CE-only BT{bt}", bt, 2048, 4096, 128256) for bt in (4096, 8192)]
    else:
        shapes = [(f"liger-shape BT{bt}", bt, 2048, 4096, 128256) for bt in (1024, 4096, 8192)]
    warmup, repeat = (1, 1) if dry_run else (1, 5)
    cells, seen = [], []
    for case, n, hs, ht, v in shapes:
        case = f"CE-only {case}" if ce_only and dry_run else case
        for impl in CE_IMPLS if ce_only else KD_IMPLS:
            flops = 2.0 * n * v * (4 * hs + (0 if ce_only else ht))  # student fwd + recompute + dX + dW; teacher
            nbytes = 4.0 * n * v * (12 if impl == "torch-full" else 1)  # full logits: ~12 fp32 [N, V] passes
            ref_s = 2.0 * n * v * (3 * hs + ht) / m.fp32_flop_rate + 4.0 * n * v * 12 / m.bandwidth
            est = _cell_s(m, _calls(warmup, repeat, pre_steps=1), flops, nbytes, compiles=_compiles(impl, seen),
                          extra_s=ref_s)
            kwargs = dict(impl=impl, n=n, hs=hs, ht=ht, v=v, dtype=dtype, device=device, ce_only=ce_only,
                          grad_error=True)
            if impl == "cut-cross-entropy" and dry_run:
                kwargs["cce_impl"] = "torch_compile"  # its CPU-capable path (the "cce" kernel is CUDA-only)
            cells.append(Cell(case, impl, Job("benchmarks.bench_fused_linear_kd:build_case", kwargs), dtype,
                              f"N={n} Hs={hs} Ht={ht} V={v}", est, warmup, repeat,
                              needs_module=PEER_MODULE.get(impl)))
    return _eager_first(cells)


# ------------------------------------------------------------------------------------------------ LoRA
LORA_IMPLS = ["tellneo", "peft", "peft+compile", "base-linear"]


def _lora_cells(dry_run: bool) -> list[Cell]:
    m = CPU_MODEL if dry_run else GPU_MODEL
    device, dtype = ("cpu", "float32") if dry_run else ("cuda", "bfloat16")
    dims, tokens = ([64], 128) if dry_run else ([4096, 8192], 4096)
    warmup, repeat = (1, 2) if dry_run else (3, 20)
    cells, seen = [], []
    for d in dims:
        for p in (0.0, 0.1):
            for impl in LORA_IMPLS:
                if impl == "base-linear" and p > 0:
                    continue  # dropout does not apply to the frozen base alone: its p0 row is the floor
                kwargs = dict(impl=impl, d_in=d, d_out=d, tokens=tokens, p=p, dtype=dtype, device=device,
                              backend="triton")
                flops = 4.0 * tokens * d * d  # base forward + dX (the frozen base has no dW)
                nbytes = 2.0 * tokens * d * 8  # x, y, dy, dx (+ dropout mask for PEFT) at 2 bytes
                est = _cell_s(m, _calls(warmup, repeat), flops, nbytes, compiles=_compiles(impl, seen))
                cells.append(Cell(f"square {d} T{tokens} p{p}", impl,
                                  Job("benchmarks.bench_lora_linear:build_layer_case", kwargs), dtype,
                                  f"N={tokens} in={d} out={d} r=16", est, warmup, repeat))
    return _eager_first(cells)


# ------------------------------------------------------------------------------------------------ mixer
MIXER_IMPLS = ["tellneo_cuda", "tellneo_cpp_then_copy", "index_select"]


def _mixer_cells(dry_run: bool) -> list[Cell]:
    m = CPU_MODEL if dry_run else GPU_MODEL
    device = "cpu" if dry_run else "cuda"
    n_samples, batches = (2000, [8]) if dry_run else (200_000, [64, 256])
    warmup, repeat = (1, 3) if dry_run else (3, 20)
    cells = []
    for rpb in batches:
        for impl in MIXER_IMPLS:
            nbytes = rpb * 4096 * 8.0 * 5  # five int64 outputs per token
            # building: ~60M random tokens and a bfd plan on the host (~3 s at 200k samples)
            est = _cell_s(m, _calls(warmup, repeat), 0.0, nbytes, build_s=m.build_s + n_samples * 1.5e-5)
            cells.append(Cell(f"{rpb}x4096", impl, Job("benchmarks.bench_mixer:job_cuda_emit",
                                                         dict(impl=impl, rows_per_batch=rpb, device=device,
                                                              n_samples=n_samples)),
                              "int64 out", f"rows={rpb},seq_len=4096", est, warmup, repeat,
                              needs_cuda=impl == "tellneo_cuda"))
    return cells


# ------------------------------------------------------------------------------------------------ NEO step
NEO_IMPLS = ["plain", "tellneo-kd", "tellneo"]


def _neo_cells(dry_run: bool) -> list[Cell]:
    from benchmarks.bench_neo_step import RANDOM_LLAMAS

    m = CPU_MODEL if dry_run else GPU_MODEL
    model, batch, seq, device, dtype = ("llama-tiny", 2, 32, "cpu", "float32") if dry_run else \
        ("llama-1b", 4, 2048, "cuda", "bfloat16")
    cfg = RANDOM_LLAMAS[model]
    h, i, layers, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    tokens = batch * seq
    student, teacher = per_layer * layers // 2 + h * v, per_layer * layers + h * v
    flops = tokens * (4.0 * student + 2.0 * teacher)  # student fwd + dX (frozen base), teacher fwd
    warmup, repeat = 1, (2 if dry_run else 3)
    cells = []
    for impl in NEO_IMPLS:
        nbytes = tokens * v * 4.0 * (10 if impl == "plain" else 1)  # full logits of both models, fp32 upcasts
        est = _cell_s(m, _calls(warmup, repeat), flops, nbytes, build_s=m.model_build_s)
        cells.append(Cell(f"{model} B{batch}xT{seq}", impl,
                          Job("benchmarks.bench_neo_step:job_step", dict(impl=impl, batch=batch, seq_len=seq,
                                                                          dropout=0.0, device=device, model=model,
                                                                          dtype=dtype)),
                          dtype, f"B={batch},T={seq},V={v},teacher {layers} layers,student {layers // 2},LoRA r16",
                          est, warmup, repeat))
    return cells


def bench_stages(dry_run: bool) -> list[BenchStage]:
    """The benchmark stages in priority order (what runs first survives a short budget)."""
    device = "cpu" if dry_run else "cuda"
    return [
        BenchStage("kd", "fused lm_head + CE + JSD vs Liger (eager, compiled) and full logits; bf16 grad error "
                   "vs fp32", "fused_linear_kd", "liger", _kd_cells(dry_run, ce_only=False), device),
        BenchStage("ce", "CE-only fused lm_head vs cut-cross-entropy", "fused_linear_ce", "cut-cross-entropy",
                   _kd_cells(dry_run, ce_only=True), device),
        BenchStage("lora", "fused LoRA linear vs PEFT eager / PEFT + torch.compile / frozen base linear",
                   "lora_linear", "peft", _lora_cells(dry_run), device),
        BenchStage("mixer", "CUDA mixer emit vs C++ emit + copy and index_select", "mixer_cuda_emit",
                   "tellneo_cpp_then_copy", _mixer_cells(dry_run), device),
        BenchStage("neo", "one NEO step (random 1B-class Llama student, teacher 2x deeper) vs PEFT + full logits "
                   "+ F.kl_div", "neo_step", "plain", _neo_cells(dry_run), device),
    ]
