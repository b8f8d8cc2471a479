"""Benchmark: lm_head + CE + KD loss, forward + backward, tellneo's fused_linear_kd vs Liger and full-logits PyTorch.

Every case is ``loss = (1 - a) CE + a JSD(beta=0.5)`` with ``a = 0.5``, T = 1 (the setting all implementations
share), gradients for the student hidden states and the student lm_head weight, teacher frozen, 1 in 8 labels
ignored.

CPU (default), float32, each (case, impl) in a fresh process; ``peak_mb`` is the growth of peak RSS during the
first forward+backward (so allocator caches of one impl cannot hide another's memory), ``time_ms`` the median of
``--repeat`` calls after ``--warmup``:

* ``smollm2``: N=2048 tokens, Hs=Ht=576, V=49152 (SmolLM2-135M student and teacher shapes);
* ``smollm2-360m<-1.7b``: N=4096, Hs=960, Ht=2048, V=49152 (SmolLM2-360M student, SmolLM2-1.7B teacher).

Implementations: ``liger`` (``LigerFusedLinearJSDLoss``, compiled=False, its default chunk of 1024 rows; the
baseline of the ratios), ``tellneo-torch`` (``backend="torch"``, the CPU path), ``torch-full`` (the full-logits
reference ``fused_linear_kd_reference``: plain PyTorch on ``[N, V]`` logits with autograd). ``--liger-compiled``
adds Liger with its default ``compiled=True`` (torch.compile/inductor on CPU); its builder runs one untimed call
first so the compilation is not timed, which also means its peak_mb is measured on a warm heap (understated).
The extra column ``load1`` is the 1-minute load average when the kept measurement ran; with ``--rounds R`` every
(case, impl) runs R times, interleaved with the others, and the fastest round is kept (the machine is shared).

GPU (``--device cuda``), bfloat16, results in benchmarks/results/gpu/: Liger's own benchmark shape (BT in {1024,
2048, 4096, 8192}, Hs 2048, Ht 4096, V 128256) plus V 256000, vs ``liger+compile`` (baseline), ``trl-chunk256``
(TRL's generalized_jsd_loss on 256-token chunks under activation checkpointing), ``torch-full``; and a CE-only
case (alpha 0) vs ``cut-cross-entropy`` when it is installed. Out-of-memory cells are reported, not hidden.

    python -m benchmarks.bench_fused_linear_kd [--device cpu|cuda] [--quick] [--rounds R] [--liger-compiled]
                                               [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from benchmarks import add_out_flag, require_device, write_results

SUITE = "fused_linear_kd"
CPU_CASES = [
    # (case, N, Hs, Ht, V)
    ("smollm2", 2048, 576, 576, 49152),
    ("smollm2-360m<-1.7b", 4096, 960, 2048, 49152),
]
GPU_CASES = [(f"liger-shape BT{bt}", bt, 2048, 4096, 128256) for bt in (1024, 2048, 4096, 8192)] + [
    ("V256000 BT4096", 4096, 2048, 4096, 256000),
]
ALPHA, BETA = 0.5, 0.5


def _inputs(n: int, hs: int, ht: int, v: int, dtype: torch.dtype, device: str, teacher: bool = True):
    """Random inputs drawn on ``device`` itself (a CPU draw of a [128256, 4096] weight takes seconds)."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    sh = randn(n, hs).requires_grad_(True)
    sw = randn(v, hs, scale=hs**-0.5).requires_grad_(True)
    th = randn(n, ht) if teacher else None
    tw = randn(v, ht, scale=ht**-0.5) if teacher else None
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[::8] = -100
    return sh, sw, th, tw, labels


def _trl_chunked(sh, sw, th, tw, labels, chunk: int = 256):
    """TRL-style: per 256-token chunk, lm_head + CE + generalized_jsd_loss under activation checkpointing."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    n_valid = (labels != -100).sum().clamp_min(1)

    def part(h, t_h, lab):
        s = h @ sw.T
        with torch.no_grad():
            t = t_h @ tw.T
        ce = F.cross_entropy(s.float(), lab, ignore_index=-100, reduction="sum")
        kd = GKDTrainer.generalized_jsd_loss(s[None].float(), t[None].float(), labels=lab[None], beta=BETA,
                                             reduction="sum")
        return (1 - ALPHA) * ce + ALPHA * kd

    total = 0.0
    for i in range(0, sh.shape[0], chunk):
        total = total + checkpoint(part, sh[i:i + chunk], th[i:i + chunk], labels[i:i + chunk], use_reentrant=False)
    return total / n_valid


def build_case(impl: str, n: int, hs: int, ht: int, v: int, dtype: str = "float32", device: str = "cpu",
               ce_only: bool = False, grad_error: bool = False, cce_impl: str = "cce"):
    """Returns (fwd+bwd callable, extra columns) for one implementation of one shape.

    ``grad_error``: also run one step before returning and add ``loss_rel_err`` / ``grad_h_rel_err`` /
    ``grad_w_rel_err``, the relative errors of this impl's loss and gradients (in ``dtype``) against the fp32
    full-logits reference on the same inputs (see :func:`errors_vs_fp32`). ``cce_impl``: cut-cross-entropy's
    ``impl`` ("cce" is its Triton kernel, CUDA only; "torch_compile" its CPU-capable path).
    """
    from tellneo.ops import fused_linear_kd, fused_linear_kd_reference

    dt = getattr(torch, dtype)
    sh, sw, th, tw, labels = _inputs(n, hs, ht, v, dt, device, teacher=not ce_only)
    alpha = 0.0 if ce_only else ALPHA
    extra = {"N": n, "Hs": hs, "Ht": ht, "V": v, "alpha": alpha}

    if impl in ("tellneo-torch", "tellneo-triton"):
        backend = impl.split("-")[1]

        def loss():
            return fused_linear_kd(sh, sw, th, tw, labels, divergence="jsd", beta=BETA, alpha=alpha, backend=backend)
    elif impl == "torch-full":
        def loss():
            return fused_linear_kd_reference(sh, sw, th, tw, labels, divergence="jsd", beta=BETA, alpha=alpha)
    elif impl in ("liger", "liger+compile"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        mod = LigerFusedLinearJSDLoss(weight_hard_loss=1 - alpha, weight_soft_loss=alpha, beta=BETA,
                                      compiled=impl == "liger+compile")

        def loss():
            return mod(sh, sw, th, tw, labels)
    elif impl == "trl-chunk256":
        def loss():
            return _trl_chunked(sh, sw, th, tw, labels)
    elif impl == "cut-cross-entropy":
        from cut_cross_entropy import linear_cross_entropy

        def loss():
            return linear_cross_entropy(sh, sw, labels, ignore_index=-100, impl=cce_impl)
    else:
        raise ValueError(f"unknown impl {impl!r}")

    def step():
        sh.grad = None
        sw.grad = None
        out = loss()
        out.backward()
        return out

    if impl == "liger+compile" or grad_error:
        out = step()  # compile (liger+compile) outside the measured calls
        if grad_error:
            extra.update(errors_vs_fp32(out, sh, sw, th, tw, labels, alpha))
        sh.grad = sw.grad = None
    return step, extra


def errors_vs_fp32(loss: torch.Tensor, sh: torch.Tensor, sw: torch.Tensor, th: torch.Tensor | None,
                   tw: torch.Tensor | None, labels: torch.Tensor, alpha: float) -> dict[str, float]:
    """Relative errors of ``loss`` and of ``sh.grad`` / ``sw.grad`` (from one step of an impl, any dtype) against
    :func:`tellneo.ops.fused_linear_kd_reference` run in float32 on the same (upcast) inputs."""
    from tellneo.bench import rel_error
    from tellneo.ops import fused_linear_kd_reference

    sh32 = sh.detach().float().requires_grad_(True)
    sw32 = sw.detach().float().requires_grad_(True)
    th32 = th.float() if th is not None else None
    tw32 = tw.float() if tw is not None else None
    ref = fused_linear_kd_reference(sh32, sw32, th32, tw32, labels, divergence="jsd", beta=BETA, alpha=alpha)
    ref.backward()
    errs = {"loss_rel_err": rel_error(loss, ref), "grad_h_rel_err": rel_error(sh.grad, sh32.grad),
            "grad_w_rel_err": rel_error(sw.grad, sw32.grad)}
    return {k: float(f"{v:.3e}") for k, v in errs.items()}


def cases(device: str, quick: bool, liger_compiled: bool):
    if device.startswith("cuda"):
        impls = ["liger+compile", "tellneo-triton", "trl-chunk256", "torch-full"]
        for name, n, hs, ht, v in GPU_CASES[: 1 if quick else None]:
            yield name, n, hs, ht, v, "bfloat16", impls, False
        yield "CE-only BT4096", 4096, 2048, 4096, 128256, "bfloat16", ["cut-cross-entropy", "tellneo-triton",
                                                                        "torch-full"], True
    else:
        impls = ["liger", "tellneo-torch", "torch-full"] + (["liger+compile"] if liger_compiled else [])
        for name, n, hs, ht, v in CPU_CASES[: 1 if quick else None]:
            yield name, n, hs, ht, v, "float32", impls, False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_fused_linear_kd",
        description="lm_head + CE + JSD forward+backward: tellneo fused_linear_kd vs Liger, TRL-style chunking and "
                    "full-logits PyTorch (CSV + PNG in benchmarks/results).",
    )
    parser.add_argument("--device", default="cpu", help="cpu (SmolLM2 shapes, fp32) or cuda (Liger's shapes, bf16)")
    parser.add_argument("--quick", action="store_true", help="first shape only (smoke test of the script)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="calls before timing (the first is the memory one)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every (case, impl) this many times, interleaved, and keep the fastest round "
                             "(the machine is shared: a round can be slowed by other work; load1 is recorded)")
    parser.add_argument("--liger-compiled", action="store_true",
                        help="CPU: also run Liger with compiled=True (inductor; compiles for ~a minute)")
    add_out_flag(parser)
    args = parser.parse_args(argv)

    from tellneo.bench import Job, Row, add_ratios, device_name, measure

    require_device(parser, args.device)
    baseline = "liger+compile" if args.device.startswith("cuda") else "liger"
    dev_name = device_name(args.device)
    best: dict[tuple[str, str], Row] = {}
    all_cases = list(cases(args.device, args.quick, args.liger_compiled))
    for rnd in range(args.rounds):
        for case, n, hs, ht, v, dtype, impls, ce_only in all_cases:
            base = "cut-cross-entropy" if ce_only else baseline
            for impl in impls:
                job = Job("benchmarks.bench_fused_linear_kd:build_case",
                          dict(impl=impl, n=n, hs=hs, ht=ht, v=v, dtype=dtype, device=args.device, ce_only=ce_only))
                load = os.getloadavg()[0]
                try:
                    m = measure(job, args.device, warmup=args.warmup, repeat=args.repeat)
                except (RuntimeError, ImportError) as exc:  # OOM or a peer that is not installed: say so, go on
                    reason = "out of memory" if "out of memory" in str(exc).lower() else type(exc).__name__
                    print(f"{case:22s} {impl:16s} skipped: {reason}: {str(exc).splitlines()[-1][:200]}", flush=True)
                    continue
                print(f"round {rnd}  {case:22s} {impl:16s} {m.time_ms:10.1f} ms  peak {m.peak_mb:9.1f} MB  "
                      f"load {load:.2f}", flush=True)
                prev = best.get((case, impl))
                if prev is None or m.time_ms < prev.time_ms:
                    extra = dict(m.extra, load1=round(load, 2), rounds=args.rounds, baseline_for_case=base)
                    best[(case, impl)] = Row(SUITE, case, impl, dev_name, dtype, f"N={n} Hs={hs} Ht={ht} V={v}",
                                             m.time_ms, m.peak_mb, extra)
    rows = list(best.values())
    records = []
    for b in dict.fromkeys(r.extra["baseline_for_case"] for r in rows):  # CE-only cases have their own baseline
        records += add_ratios([x for x in rows if x.extra["baseline_for_case"] == b], b)
    write_results(records, args.device, args.out, SUITE, "lm_head + CE + JSD fwd+bwd: tellneo vs Liger / full logits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
