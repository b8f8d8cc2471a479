"""Student construction (layer dropping), vocabulary compatibility, and the NEO preset."""

from __future__ import annotations

import copy

import pytest
import torch

from tellneo.recipes.neo import (
    NEO_PRESET,
    KDSettings,
    VocabMismatchError,
    build_student,
    check_compatible,
    parse_layers,
    select_layers,
)
from tests.recipes.helpers import one_thread, tiny_teacher  # noqa: F401 (fixture)


@pytest.mark.parametrize(
    "spec, keep, expected",
    [
        ("every_other", None, [0, 2, 4, 6, 8]),
        ("first_n", None, [0, 1, 2, 3, 4]),
        ("first_n", 3, [0, 1, 2]),
        (0.5, None, [0, 2, 4, 7, 9]),
        (1.0, None, list(range(10))),
        ([7, 1, 3], None, [1, 3, 7]),
    ],
)
def test_select_layers(spec, keep, expected):
    assert select_layers(10, spec, keep=keep) == expected


@pytest.mark.parametrize("spec, keep", [("half", None), ([0, 10], None), ([1, 1], None), ([], None), (0.0, None),
                                        ("first_n", 11)])
def test_select_layers_rejects(spec, keep):
    with pytest.raises(ValueError):
        select_layers(10, spec, keep=keep)


def test_parse_layers():
    assert parse_layers("every_other") == ("every_other", None)
    assert parse_layers("first_n:4") == ("first_n", 4)
    assert parse_layers("0,2,5") == ([0, 2, 5], None)
    assert parse_layers("0.25") == (0.25, None)


@pytest.mark.parametrize("tied", [False, True])
def test_student_is_the_teacher_without_the_dropped_layers(tied):
    teacher = tiny_teacher(num_hidden_layers=5, tie_word_embeddings=tied)
    before = copy.deepcopy(teacher.state_dict())
    student = build_student(teacher, [0, 2, 4])
    assert student.config.num_hidden_layers == 3 and student.config.tellneo_teacher_layers == [0, 2, 4]
    assert teacher.config.num_hidden_layers == 5  # the teacher is untouched
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    copied, original = student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight
    assert copied.data_ptr() != original.data_ptr()  # a copy, not shared storage
    torch.testing.assert_close(copied, original)
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied

    # the student computes exactly what the teacher computes with only those layers
    assert_computes_the_cut_teacher(student, teacher, [0, 2, 4], body=teacher.model, layers="layers",
                                    attention="self_attn")


def assert_computes_the_cut_teacher(student, teacher, kept, *, body, layers, attention):
    """``student`` gives exactly the logits of a copy of ``teacher`` whose layer list (``body.<layers>``) is cut
    by hand to ``kept`` (attention caches renumbered)."""
    reference = copy.deepcopy(teacher)
    holder = next(m for m in reference.modules() if type(m) is type(body))
    setattr(holder, layers, torch.nn.ModuleList([getattr(holder, layers)[i] for i in kept]))
    for i, layer in enumerate(getattr(holder, layers)):
        getattr(layer, attention).layer_idx = i
    reference.config.num_hidden_layers = len(kept)
    ids = torch.randint(0, reference.config.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_student_kv_cache_generation_matches_full_recompute():
    student = build_student(tiny_teacher(num_hidden_layers=4), "every_other")
    ids = torch.randint(0, 251, (1, 6))
    with torch.no_grad():
        cached = student.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        seq = ids
        for _ in range(8):
            nxt = student(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)


def test_build_student_rejects_unknown_layouts():
    with pytest.raises(TypeError, match=r"supported layouts are \.model\.layers \(Llama family\) and \.model\.h"):
        build_student(torch.nn.Linear(2, 2))


def test_gpt2_style_student():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=5, n_head=4)).eval()
    student = build_student(teacher, [1, 3, 4])
    assert student.config.n_layer == 3 and len(student.transformer.h) == 3
    assert [block.attn.layer_idx for block in student.transformer.h] == [0, 1, 2]
    assert student.lm_head.weight is student.transformer.wte.weight  # GPT-2 ties its head
    assert_computes_the_cut_teacher(student, teacher, [1, 3, 4], body=teacher.transformer, layers="h",
                                    attention="attn")
    ids = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        cached = student.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        seq = ids[:1, :4]
        for _ in range(5):
            seq = torch.cat([seq, student(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq)


class _Tok:
    def __init__(self, vocab, **special):
        self.vocab = vocab
        self.eos_token_id = special.get("eos", 2)
        self.bos_token_id = 1
        self.pad_token_id = None

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


def test_check_compatible():
    teacher = tiny_teacher(vocab_size=256)  # padded teacher table: fine
    student = build_student(tiny_teacher(), "every_other")  # vocab 251
    check_compatible(teacher, student)
    with pytest.raises(VocabMismatchError, match="must cover every student token"):
        check_compatible(student, teacher)
    vocab = {f"t{i}": i for i in range(251)}
    check_compatible(teacher, student, _Tok(vocab), _Tok(dict(list(vocab.items())[:200])))
    other = dict(vocab, t5=7, t7=5)
    with pytest.raises(VocabMismatchError, match="tokenizers differ"):
        check_compatible(teacher, student, _Tok(vocab), _Tok(other))
    with pytest.raises(VocabMismatchError, match="eos_token_id"):
        check_compatible(teacher, student, _Tok(vocab), _Tok(vocab, eos=3))


def test_neo_preset_is_the_authors_configuration():
    assert NEO_PRESET.lora.r == 64 and NEO_PRESET.lora.alpha == 128 and NEO_PRESET.lora.dropout == 0.0
    assert NEO_PRESET.lora.target_modules == "all-linear"
    assert NEO_PRESET.kd == KDSettings(alpha=0.5, temperature=1.0, divergence="forward_kl")
    assert (NEO_PRESET.learning_rate, NEO_PRESET.lr_scheduler_type, NEO_PRESET.warmup_ratio) == (2e-4, "cosine", 0.1)
    with pytest.raises(ValueError):
        KDSettings(alpha=1.5)
    with pytest.raises(ValueError):
        KDSettings(divergence="kl")
