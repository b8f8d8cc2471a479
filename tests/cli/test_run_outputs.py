"""The outputs of `tellneo distill` / `tellneo tell` stand on their own: the adapter of a layer-dropped student
loads with plain transformers + peft (onto the saved student base, not onto the teacher), and the merged model is
a plain HF directory in the chosen dtype with the KV cache on."""

from __future__ import annotations

import json

import pytest
import torch

from tellneo.cli import main
from tests.cli.test_distill_cli import distill_args
from tests.recipes.helpers import general_jsonl, one_thread, smollm2_tokenizer, tiny_model_dir  # noqa: F401


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_distilled_adapter_reloads_onto_its_student_base(tmp_path, tiny_model_dir, general_jsonl, capsys):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tellneo.recipes.distill import load_distilled_student
    from tellneo.recipes.neo import build_student

    out = tmp_path / "run"
    assert main(distill_args(tiny_model_dir, general_jsonl, out, "--save-merged", "--merged-dtype", "bf16")) == 0
    assert "loss_curve.png, adapter/, merged/, student_base/" in capsys.readouterr().out
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((out / "student_base").resolve())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["student"]["base"] == adapter_config["base_model_name_or_path"]
    assert set(summary["outputs"]) == {"adapter", "merged", "student_base"}

    ids = torch.randint(0, 49152, (2, 11), generator=torch.Generator().manual_seed(0))
    # the trained model, rebuilt the old way: the teacher's kept layers [0, 2] plus the adapter
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    reference = PeftModel.from_pretrained(build_student(teacher, [0, 2]), out / "adapter").eval()
    expected = _logits(reference, ids)
    untrained = _logits(build_student(teacher, [0, 2]).eval(), ids)
    assert not torch.allclose(expected, untrained, atol=1e-3)  # the adapter trained: it changes the logits

    auto = AutoPeftModelForCausalLM.from_pretrained(out / "adapter").eval()
    assert auto.get_base_model().config.num_hidden_layers == 2
    torch.testing.assert_close(_logits(auto, ids), expected, rtol=1e-5, atol=1e-5)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "student_base"),
                                      out / "adapter").eval()
    torch.testing.assert_close(_logits(plain, ids), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(load_distilled_student(out), ids), expected, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out / "student_base").get_vocab() == \
        AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()

    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert merged.dtype == torch.bfloat16 and merged.config.use_cache is True
    assert not any("lora" in k for k in merged.state_dict())
    got = _logits(merged, ids)
    err = (got - expected).norm() / expected.norm()
    assert err < 2e-2, err  # bf16 weights: ~3 significant digits
    assert json.loads((out / "merged" / "config.json").read_text())["use_cache"] is True


def test_bad_merged_dtype_is_refused(tmp_path, tiny_model_dir, general_jsonl, capsys):
    with pytest.raises(SystemExit) as exc:
        main(distill_args(tiny_model_dir, general_jsonl, tmp_path / "o", "--merged-dtype", "int8"))
    assert exc.value.code == 2 and "--merged-dtype: invalid choice" in capsys.readouterr().err
    from tellneo.recipes.common import RecipeError
    from tellneo.recipes.distill import DistillConfig

    with pytest.raises(RecipeError, match="merged-dtype must be one of fp32, bf16, fp16, got 'int8'"):
        DistillConfig(merged_dtype="int8").resolved()


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_merged_model_dtype_and_cache(dtype):
    from tellneo.recipes.common import LoraSettings, attach_lora
    from tellneo.recipes.outputs import MERGED_DTYPES, merged_model
    from tests.recipes.helpers import tiny_teacher

    model = attach_lora(tiny_teacher(), LoraSettings(r=4, dropout=0.0, patch=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.get_base_model().config.use_cache = False  # as the Trainer leaves it under gradient checkpointing
    ids = torch.randint(0, 251, (2, 9))
    expected = _logits(model.eval(), ids)
    merged = merged_model(model, dtype)
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.config.use_cache is True
    assert {p.dtype for p in merged.parameters()} == {MERGED_DTYPES[dtype]}
    err = ((_logits(merged, ids) - expected).norm() / expected.norm()).item()
    assert err < {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-3}[dtype], err


def test_tell_saves_merged_and_gguf_quietly(tmp_path, tiny_model_dir, general_jsonl, capfd):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.cli.test_tell_cli import tell_args

    out = tmp_path / "tell"
    assert main(tell_args(tiny_model_dir, general_jsonl, out, "--save-merged", "--save-gguf")) == 0
    captured = capfd.readouterr()
    assert "loss_curve.png, adapter/, merged/, model.gguf" in captured.out
    err = captured.err
    for bar in ("Loading weights", "Writing model shards", "it/s]"):  # --quiet: no progress bars at all
        assert bar not in err, err
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["outputs"]) == {"adapter", "merged", "gguf"}

    ids = torch.randint(0, 49152, (2, 11), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trained = _logits(PeftModel.from_pretrained(base, out / "adapter").eval(), ids)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert merged.dtype == torch.float32 and merged.config.use_cache is True
    torch.testing.assert_close(_logits(merged, ids), trained, rtol=1e-4, atol=1e-4)
    gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(gguf, ids), trained, rtol=1e-4, atol=1e-4)
    text = "Convert 3 March 2021 to ISO 8601."
    assert AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(tiny_model_dir)(text)["input_ids"]


def test_save_gguf_refuses_an_unsupported_model_before_training(tmp_path, general_jsonl, smollm2_tokenizer,
                                                                 capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.cli.test_tell_cli import tell_args

    qwen = tmp_path / "qwen"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
                     ).save_pretrained(qwen)
    smollm2_tokenizer.save_pretrained(qwen)
    out = tmp_path / "o"
    assert main(tell_args(qwen, general_jsonl, out, "--save-gguf")) == 2
    err = capsys.readouterr().err
    assert "error: --save-gguf: GGUF export supports the Llama architecture" in err and "'qwen2'" in err
    assert not (out / "metrics.jsonl").exists()
