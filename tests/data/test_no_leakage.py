"""No cross-sample leakage: a packed batch gives the same logits and loss as its samples run one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tellneo.data import IGNORE_INDEX, TokenStore, emit_rows, plan
from tests.conftest import tiny_llama_config


def per_sample_reference(model, store):
    """Logits of every sample run alone, and the token-weighted mean loss over all samples."""
    logits, loss_sum, count = [], 0.0, 0
    for i in range(len(store)):
        ids = torch.from_numpy(store.sample(i).astype(np.int64))[None]
        labels = torch.from_numpy(store.sample_labels(i))[None]
        out = model(input_ids=ids, labels=labels, use_cache=False)
        n = int((labels[0, 1:] != IGNORE_INDEX).sum())
        if n:
            loss_sum += out.loss.item() * n
            count += n
        logits.append(out.logits[0])
    return logits, loss_sum / count


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_packed_equals_one_by_one(attn, layout):
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(attn_implementation=attn)).eval()
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 20, size=12)
    samples = [rng.integers(0, 251, size=int(n)) for n in lengths]
    labels = [np.where(rng.random(s.size) < 0.25, IGNORE_INDEX, s) for s in samples]
    store = TokenStore.from_sequences(samples, labels)
    p = plan(store.lengths, 32, strategy="bfd")
    batch = emit_rows(store, p, layout=layout)
    with torch.no_grad():
        ref_logits, ref_loss = per_sample_reference(model, store)
        out = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                    use_cache=False)
    assert torch.allclose(out.loss, torch.tensor(ref_loss), rtol=1e-5, atol=1e-6)
    # and token by token: every sample's logits inside the packed batch equal its stand-alone logits
    packed_logits = out.logits.reshape(-1, out.logits.shape[-1])
    if layout == "rows":
        starts = {int(p.sample[q]): int(p.row[q]) * p.seq_len + int(p.offset[q]) for q in range(p.num_pieces)}
        row_pos = {i: starts[i] for i in range(len(store))}
    else:
        order = [int(p.sample[q]) for r in range(p.num_rows) for q in p.row_pieces[p.row_ptr[r] : p.row_ptr[r + 1]]]
        pos, row_pos = 0, {}
        for s in order:
            row_pos[s] = pos
            pos += int(store.lengths[s])
    for i, ref in enumerate(ref_logits):
        got = packed_logits[row_pos[i] : row_pos[i] + ref.shape[0]]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
