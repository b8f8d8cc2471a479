"""Mixer benchmarks: planning vs TRL ``pack_dataset``, emitting batches vs HF ``DataCollatorWithFlattening``.

    python -m benchmarks.bench_mixer [--suite plan emit cuda] [--quick]

Writes ``benchmarks/results/mixer_plan.csv`` / ``mixer_emit.csv`` (+ PNG) on CPU and
``benchmarks/results/gpu/mixer_cuda_emit.csv`` when a GPU is visible. Every (case, impl) runs in a fresh process
(see tellneo.bench). Lengths are lognormal with median 300 tokens, clipped to [1, 4096]; rows of 4096 tokens.

What is compared:
* plan: tellneo's bfd / ffd / wrap plans against TRL ``pack_dataset(strategy="bfd")`` and ``strategy="wrapped"``
  on an Arrow dataset with the same lengths. TRL's time includes writing the packed Arrow columns, which a
  tellneo plan does not (tellneo emits batches lazily: see the emit suite for that cost).
* emit: one batch of 64 rows x 4096 tokens from a plan, against HF's collator and a ``torch.cat`` baseline fed
  the same samples as Python lists / tensors (the form a ``datasets`` pipeline hands them over in).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from benchmarks import add_out_flag, write_results
from tellneo.bench import Job, Row, add_ratios, device_name, measure

SEQ_LEN = 4096


def lognormal_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(300), 1.0, size=n)), 1, SEQ_LEN).astype(np.int64)


def random_store(n: int, seed: int = 0):
    from tellneo.data import TokenStore

    lengths = lognormal_lengths(n, seed)
    tokens = np.random.default_rng(seed + 1).integers(0, 49152, size=int(lengths.sum()), dtype=np.int32)
    return TokenStore.from_flat(tokens, np.concatenate([[0], np.cumsum(lengths)]))


# ----------------------------------------------------------------------------------------------- plan jobs
def job_tellneo_plan(n: int, strategy: str):
    from tellneo.data import plan

    lengths = lognormal_lengths(n)
    result = {}

    def run():
        result["plan"] = plan(lengths, SEQ_LEN, strategy=strategy)

    run()
    return run, {"fill_rate": round(result["plan"].fill_rate, 6), "rows": result["plan"].num_rows}


def arrow_dataset(n: int):
    import datasets
    import pyarrow as pa

    store = random_store(n)
    column = pa.ListArray.from_arrays(pa.array(store.offsets.astype(np.int32)), pa.array(store.tokens))
    return datasets.Dataset(pa.table({"input_ids": column})), store


def job_trl(n: int, strategy: str):
    from trl.data_utils import pack_dataset

    ds, store = arrow_dataset(n)
    result = {}

    def run():
        result["out"] = pack_dataset(ds, SEQ_LEN, strategy=strategy)

    run()
    rows = len(result["out"])
    return run, {"fill_rate": round(store.num_tokens / (rows * SEQ_LEN), 6), "rows": rows}


# ----------------------------------------------------------------------------------------------- emit jobs
ROWS_PER_BATCH = 64


def _batch_samples(n: int = 200_000):
    """The store, its bfd plan, the first 64 rows, and the samples in those rows (whole samples only)."""
    from tellneo.data import plan

    store = random_store(n)
    p = plan(store.lengths, SEQ_LEN, strategy="bfd")
    rows = np.arange(ROWS_PER_BATCH)
    pieces = np.concatenate([p.row_pieces[p.row_ptr[r] : p.row_ptr[r + 1]] for r in rows])
    return store, p, rows, p.sample[pieces]


def job_tellneo_emit(layout: str, threads: int):
    from tellneo.data import emit_rows

    store, p, rows, samples = _batch_samples()

    def run():
        emit_rows(store, p, rows, layout=layout, num_threads=threads)

    return run, {"tokens": int(store.lengths[samples].sum())}


def job_hf_collator():
    from transformers import DataCollatorWithFlattening

    store, _, _, samples = _batch_samples()
    features = [{"input_ids": store.sample(s).tolist()} for s in samples]
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)

    def run():
        collator(features)

    return run, {"tokens": int(store.lengths[samples].sum())}


def job_torch_cat():
    import torch

    store, _, _, samples = _batch_samples()
    tensors = [torch.from_numpy(store.sample(s).astype(np.int64)) for s in samples]

    def run():
        ids = torch.cat(tensors)
        labels = ids.clone()
        starts = torch.tensor([0] + [t.numel() for t in tensors]).cumsum(0)
        labels[starts[:-1]] = -100
        pos = torch.cat([torch.arange(t.numel()) for t in tensors])
        return ids, labels, pos

    return run, {"tokens": int(store.lengths[samples].sum())}


# ----------------------------------------------------------------------------------------------- cuda jobs
def job_cuda_emit(impl: str, rows_per_batch: int, device: str = "cuda", n_samples: int = 200_000):
    """One batch of ``rows_per_batch`` rows onto ``device``: ``tellneo_cuda`` (the CUDA emit kernel),
    ``tellneo_cpp_then_copy`` (C++ emit on the host, then a copy) or ``index_select`` (a precomputed token index
    gathered on the device). ``device="cpu"`` runs the two host-capable impls (the campaign's dry run)."""
    import torch

    from tellneo.data import emit_rows

    store, p, _, _ = _batch_samples(n_samples)
    rows = np.arange(rows_per_batch)
    if impl == "index_select":
        # baseline: gather tokens with a precomputed index on the GPU (what a plain torch pipeline would do)
        out = emit_rows(store, p, rows, layout="rows", backend="cpp")
        tokens = torch.from_numpy(store.tokens.astype(np.int64)).to(device)
        src = torch.from_numpy(np.where(out["seq_idx"].numpy() >= 0, 0, 0)).to(device)  # shape holder
        from tellneo.data.emit import row_segments

        seg_src, seg_len = row_segments(p, store, rows)
        starts = np.repeat(np.where(seg_src >= 0, seg_src, 0), seg_len) + np.concatenate(
            [np.arange(n) for n in seg_len])
        index = torch.from_numpy(starts).to(device)
        del src

        def run():
            return tokens.index_select(0, index)
    elif impl in ("tellneo_cuda", "tellneo_cpp_then_copy"):
        backend = "cuda" if impl == "tellneo_cuda" else "cpp"

        def run():
            emit_rows(store, p, rows, backend=backend, device=device)
    else:
        raise ValueError(f"unknown impl {impl!r}")

    return run, {"tokens": rows_per_batch * SEQ_LEN}


# ----------------------------------------------------------------------------------------------- suites
def suite_plan(quick: bool) -> list[Row]:
    dev = device_name("cpu")
    rows: list[Row] = []
    sizes = [200_000] if quick else [200_000, 1_000_000]
    for n in sizes:
        case = f"{n // 1000}k samples"
        jobs = {
            "tellneo_bfd": Job("benchmarks.bench_mixer:job_tellneo_plan", {"n": n, "strategy": "bfd"}),
            "tellneo_ffd": Job("benchmarks.bench_mixer:job_tellneo_plan", {"n": n, "strategy": "ffd"}),
            "tellneo_wrap": Job("benchmarks.bench_mixer:job_tellneo_plan", {"n": n, "strategy": "wrap"}),
            "trl_bfd": Job("benchmarks.bench_mixer:job_trl", {"n": n, "strategy": "bfd"}),
            "trl_wrapped": Job("benchmarks.bench_mixer:job_trl", {"n": n, "strategy": "wrapped"}),
        }
        for impl, job in jobs.items():
            heavy = impl.startswith("trl")
            m = measure(job, "cpu", warmup=1, repeat=3 if heavy else 7)
            print(f"  plan {case:>14} {impl:<22} {m.time_ms:10.1f} ms {m.peak_mb:9.1f} MB  {m.extra}", flush=True)
            rows.append(Row("mixer_plan", case, impl, dev, "int32 tokens", f"n={n},seq_len={SEQ_LEN}", m.time_ms,
                            m.peak_mb, m.extra))
    return rows


def suite_emit(quick: bool) -> list[Row]:
    dev = device_name("cpu")
    rows: list[Row] = []
    case = f"{ROWS_PER_BATCH}x{SEQ_LEN}"
    jobs = {
        "tellneo_rows_1thread": Job("benchmarks.bench_mixer:job_tellneo_emit", {"layout": "rows", "threads": 1}),
        "tellneo_rows_2threads": Job("benchmarks.bench_mixer:job_tellneo_emit", {"layout": "rows", "threads": 2}),
        "tellneo_flat_1thread": Job("benchmarks.bench_mixer:job_tellneo_emit", {"layout": "flat", "threads": 1}),
        "hf_collator": Job("benchmarks.bench_mixer:job_hf_collator"),
        "torch_cat": Job("benchmarks.bench_mixer:job_torch_cat"),
    }
    for impl, job in jobs.items():
        m = measure(job, "cpu", warmup=3, repeat=5 if quick else 15)
        m.extra["tokens_per_s"] = round(m.extra["tokens"] / (m.time_ms / 1e3))
        print(f"  emit {case} {impl:<22} {m.time_ms:9.2f} ms {m.peak_mb:8.1f} MB "
              f"{m.extra['tokens_per_s'] / 1e6:8.1f} M tokens/s", flush=True)
        rows.append(Row("mixer_emit", case, impl, dev, "int64 out", f"rows={ROWS_PER_BATCH},seq_len={SEQ_LEN}",
                        m.time_ms, m.peak_mb, m.extra))
    return rows


def suite_cuda(quick: bool) -> list[Row]:
    import torch

    if not torch.cuda.is_available():
        print("  cuda: no CUDA device visible, suite skipped (no numbers are written)")
        return []
    dev = device_name("cuda")
    rows: list[Row] = []
    for rpb in ([64] if quick else [64, 256]):
        case = f"{rpb}x{SEQ_LEN}"
        for impl in ("tellneo_cuda", "tellneo_cpp_then_copy", "index_select"):
            m = measure(Job("benchmarks.bench_mixer:job_cuda_emit", {"impl": impl, "rows_per_batch": rpb}), "cuda",
                        warmup=3, repeat=20)
            m.extra["tokens_per_s"] = round(m.extra["tokens"] / (m.time_ms / 1e3))
            rows.append(Row("mixer_cuda_emit", case, impl, dev, "int64 out", f"rows={rpb},seq_len={SEQ_LEN}",
                            m.time_ms, m.peak_mb, m.extra))
    return rows


SUITES = {"plan": (suite_plan, "trl_bfd", "cpu"), "emit": (suite_emit, "hf_collator", "cpu"),
          "cuda": (suite_cuda, "tellneo_cpp_then_copy", "cuda")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", choices=sorted(SUITES), default=sorted(SUITES),
                        help="suites to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (smoke run)")
    add_out_flag(parser)
    args = parser.parse_args(argv)
    for name in args.suite:
        fn, baseline, device = SUITES[name]
        print(f"[mixer] suite {name}")
        rows = fn(args.quick)
        if not rows:
            continue
        records = add_ratios(rows, baseline)
        write_results(records, device, args.out, f"mixer_{name}" if name != "cuda" else "mixer_cuda_emit",
                      f"mixer {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
