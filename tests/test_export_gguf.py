"""GGUF export: transformers' own GGUF reader loads the file back to the same model and tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tellneo.export import ExportError, export_gguf
from tellneo.models import hf_progress_bars
from tests.recipes.helpers import one_thread, save_tiny_model_dir, smollm2_tokenizer  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def small_bpe():
    """A byte-level BPE tokenizer of 300 tokens trained on a few lines (transformers reads a GGUF holding the
    49k-token SmolLM2 vocabulary slowly; the logits tests do not need it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.mark.parametrize("dtype, tied, budget", [("fp32", False, 1e-6), ("fp16", True, 2e-3), ("bf16", False, 1e-2)])
def test_gguf_reloads_to_the_same_logits(tmp_path, small_bpe, dtype, tied, budget, capfd):
    src = save_tiny_model_dir(tmp_path / "hf", small_bpe, tie_word_embeddings=tied, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    path = export_gguf(model, small_bpe, tmp_path / "out" / "model.gguf", dtype=dtype)
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    capfd.readouterr()
    with hf_progress_bars(False):  # what --quiet uses: no de-quantisation or weight-loading bars
        back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    err = capfd.readouterr().err
    assert "de-quantizing" not in err and "Loading weights" not in err, err
    assert back.config.num_hidden_layers == 4 and back.config.tie_word_embeddings == tied
    ids = torch.randint(0, len(small_bpe), (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(ids).logits, back(ids).logits
    err = ((got - expected).norm() / expected.norm()).item()
    assert err <= budget, f"{dtype}: relative logits error {err:.2e} > {budget:.0e}"
    if dtype == "fp32":  # the q/k rotary permutation is undone exactly: any layout slip would show here
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

        from gguf import GGUFReader

        types = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
        assert types["blk.0.attn_q.weight"] == "F32" and "output.weight" in types
    else:
        from gguf import GGUFReader

        types = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
        assert types["blk.0.attn_q.weight"] == {"fp16": "F16", "bf16": "BF16"}[dtype] and types["blk.0.attn_norm.weight"] == "F32"
        assert ("output.weight" in types) == (not tied)


def test_gguf_carries_the_tokenizer(tmp_path, smollm2_tokenizer, capfd):
    src = save_tiny_model_dir(tmp_path / "hf", smollm2_tokenizer, num_hidden_layers=1)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    path = export_gguf(model, smollm2_tokenizer, tmp_path / "model.gguf", dtype="fp16", pre_tokenizer="smollm")
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    with hf_progress_bars(False):
        pass
    AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)  # the bars are back after the block
    assert "de-quantizing" in capfd.readouterr().err
    assert len(loaded) == len(smollm2_tokenizer)
    text = "Hello world!  <|im_start|>user\n  ça va? 12345 def f(x):\treturn x**2 <|im_end|>\n"
    assert loaded(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"]
    assert (loaded.bos_token_id, loaded.eos_token_id) == (smollm2_tokenizer.bos_token_id,
                                                          smollm2_tokenizer.eos_token_id)
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        smollm2_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm" and fields["general.architecture"].contents() == "llama"


def test_gguf_export_refuses_what_it_cannot_write(tmp_path, smollm2_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(smollm2_tokenizer)))
    with pytest.raises(ExportError, match="supports the Llama architecture .* this model is 'gpt2'"):
        export_gguf(gpt2, smollm2_tokenizer, tmp_path / "a.gguf")
    src = save_tiny_model_dir(tmp_path / "hf", smollm2_tokenizer, num_hidden_layers=1)
    llama = AutoModelForCausalLM.from_pretrained(src)
    with pytest.raises(ExportError, match="dtype must be one of fp32, fp16, bf16, got 'q4'"):
        export_gguf(llama, smollm2_tokenizer, tmp_path / "b.gguf", dtype="q4")
    peft = get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ExportError, match="merge the LoRA adapters first"):
        export_gguf(peft, smollm2_tokenizer, tmp_path / "c.gguf")
    with pytest.raises(ExportError, match="plain RoPE only; this model uses rope_type 'llama3'"):
        llama3 = save_tiny_model_dir(tmp_path / "l3", smollm2_tokenizer, num_hidden_layers=1, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
        export_gguf(AutoModelForCausalLM.from_pretrained(llama3), smollm2_tokenizer, tmp_path / "d.gguf")

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    word_level = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1},
                                                                                     unk_token="[UNK]")))
    with pytest.raises(ExportError, match="byte-level BPE tokenizers .* this tokenizer is a WordLevel model"):
        export_gguf(AutoModelForCausalLM.from_pretrained(src), word_level, tmp_path / "e.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))
