"""Recipe configs: a preset means the same from Python and from the CLI (every field, learning rate included),
the CLI's choices are the library's constants, LoRA variants reach PEFT and the run's identity, the former flat
keywords and manifests still work. No training here (fast)."""

from __future__ import annotations

import json
import math

import pytest

from tellneo.cli import build_parser
from tellneo.commands import distill as distill_cmd
from tellneo.commands import tell as tell_cmd
from tellneo.io import config_hash
from tellneo.recipes.distill import DistillConfig
from tellneo.recipes.errors import RecipeError
from tellneo.recipes.lora import LORA_VARIANTS, LoraSettings, attach_lora, lora_config_kwargs
from tellneo.recipes.outputs import MERGED_DTYPES
from tellneo.recipes.settings import (
    DEFAULT_PRESET,
    DIVERGENCES,
    LR_SCHEDULERS,
    MODES,
    NEO_PRESET,
    PRESETS,
    TELL_METHODS,
    TELL_SPREADS,
    TELL_TRAIN_DEFAULTS,
    TRAIN_DEFAULTS,
    KDSettings,
)
from tellneo.recipes.tell import TellConfig
from tellneo.recipes.training import TrainSettings
from tests.recipes.helpers import tiny_teacher


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("preset", ["default", "neo"])
def test_a_preset_from_python_is_the_preset_from_the_cli(preset):
    python = DistillConfig(preset=preset)
    cli = distill_cmd.config_from_args(parse("distill", "--preset", preset))
    assert cli.resolve() == python.resolve()
    assert config_hash(cli.manifest()) == config_hash(python.manifest())  # one run, not two
    lora, kd, train = python.resolve()
    expected = PRESETS[preset]
    assert (lora, kd) == (expected.lora, expected.kd)
    assert (train.learning_rate, train.lr_scheduler, train.warmup_ratio, train.epochs) == (
        expected.learning_rate, expected.lr_scheduler_type, expected.warmup_ratio, expected.num_train_epochs)


def test_the_neo_preset_trains_at_its_own_learning_rate_from_python():
    # the bug: the preset's learning rate lived in the CLI only, DistillConfig(preset="neo") trained at 1e-3
    assert DistillConfig(preset="neo").resolve()[2].learning_rate == NEO_PRESET.learning_rate == 2e-4
    assert DistillConfig().resolve()[2].learning_rate == DEFAULT_PRESET.learning_rate == 1e-3
    # a TrainSettings given without a learning rate still gets the preset's
    train = DistillConfig(preset="neo", train=TrainSettings(max_steps=5)).resolve()[2]
    assert (train.max_steps, train.learning_rate) == (5, 2e-4)


def test_explicit_flags_and_fields_win_over_the_preset():
    cfg = distill_cmd.config_from_args(parse("distill", "--preset", "neo", "--learning-rate", "5e-3",
                                             "--lora-r", "8", "--alpha", "0.9", "--warmup-ratio", "0.0"))
    lora, kd, train = cfg.resolve()
    assert (train.learning_rate, train.warmup_ratio, train.lr_scheduler) == (5e-3, 0.0, "cosine")
    assert (lora.r, lora.alpha, lora.dropout) == (8, 16.0, 0.0)  # neo: alpha = 2 x rank, its dropout
    assert kd == NEO_PRESET.kd.replace(alpha=0.9)
    python = DistillConfig(preset="neo", lora=NEO_PRESET.lora_with(r=8), kd=NEO_PRESET.kd.replace(alpha=0.9),
                           train=TrainSettings(max_steps=24, learning_rate=5e-3, warmup_ratio=0.0))
    assert python.resolve() == cfg.resolve()
    assert distill_cmd.config_from_args(parse("distill", "--lora-r", "8")).resolve()[0].alpha == 32.0  # default


def test_tell_settings_left_unset_are_the_recipes():
    cli = tell_cmd.config_from_args(parse("tell"))
    assert cli.resolve() == TellConfig().resolve()
    assert config_hash(cli.manifest()) == config_hash(TellConfig().manifest())
    lora, train = TellConfig(train=TrainSettings(max_steps=3)).resolve()
    assert lora == LoraSettings() and train.learning_rate == TELL_TRAIN_DEFAULTS["learning_rate"] == 1e-3
    assert tell_cmd.config_from_args(parse("tell", "--lr", "3e-3", "--lora-r", "4")).resolve()[1].learning_rate \
        == 3e-3
    # TrainSettings on its own (outside a recipe) keeps its former defaults
    args = TrainSettings(max_steps=2).training_arguments("unused")
    assert (args.learning_rate, args.lr_scheduler_type) == (TRAIN_DEFAULTS["learning_rate"], "cosine")


def _choices(parser, command: str, dest: str):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return tuple(next(a for a in sub._actions if a.dest == dest).choices)


def test_cli_choices_are_the_library_constants():
    p = build_parser()
    assert _choices(p, "distill", "preset") == tuple(PRESETS)
    assert _choices(p, "distill", "mode") == _choices(p, "tell", "mode") == MODES
    assert _choices(p, "distill", "divergence") == DIVERGENCES
    assert _choices(p, "distill", "lora_variant") == _choices(p, "tell", "lora_variant") == LORA_VARIANTS
    assert _choices(p, "distill", "lr_scheduler") == _choices(p, "tell", "lr_scheduler") == LR_SCHEDULERS
    assert _choices(p, "tell", "method") == TELL_METHODS and _choices(p, "tell", "spread") == TELL_SPREADS
    assert _choices(p, "distill", "merged_dtype") == _choices(p, "tell", "merged_dtype") == tuple(MERGED_DTYPES)
    with pytest.raises(RecipeError, match="lr-scheduler must be one of cosine"):
        TrainSettings(lr_scheduler="cosine_restarts")


@pytest.mark.parametrize("variant, switch", [("lora", {}), ("rslora", {"use_rslora": True}),
                                             ("dora", {"use_dora": True}),
                                             ("pissa", {"init_lora_weights": "pissa"})])
def test_lora_variants_map_onto_peft(variant, switch):
    kwargs = lora_config_kwargs(LoraSettings(r=4, alpha=8.0, variant=variant))
    assert {k: kwargs[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules")} == \
        {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.05, "target_modules": "all-linear"}
    assert {k: v for k, v in kwargs.items() if k in ("use_rslora", "use_dora", "init_lora_weights")} == switch
    model = attach_lora(tiny_teacher(), LoraSettings(r=4, alpha=8.0, dropout=0.0, variant=variant, patch=False))
    config = model.peft_config["default"]
    assert config.use_rslora is (variant == "rslora") and config.use_dora is (variant == "dora")
    assert config.init_lora_weights == ("pissa" if variant == "pissa" else True)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8.0 / (math.sqrt(4) if variant == "rslora" else 4))


def test_the_lora_variant_is_part_of_the_run():
    hashes = {config_hash(DistillConfig(lora=LoraSettings(variant=v)).manifest()) for v in LORA_VARIANTS}
    assert len(hashes) == len(LORA_VARIANTS)
    assert len({config_hash(TellConfig(lora=LoraSettings(variant=v)).manifest()) for v in LORA_VARIANTS}) == 4
    assert distill_cmd.config_from_args(parse("distill", "--preset", "neo", "--lora-variant", "dora")).lora == \
        NEO_PRESET.lora.replace(variant="dora")
    assert tell_cmd.config_from_args(parse("tell", "--lora-variant", "rslora")).lora.variant == "rslora"
    assert DistillConfig().resolve()[0].variant == "lora"
    with pytest.raises(ValueError, match="LoRA variant must be one of lora, rslora, dora, pissa"):
        LoraSettings(variant="vera")
    with pytest.raises(ValueError, match="extra sets use_dora"):
        LoraSettings(variant="dora", extra={"use_dora": False})
    assert "rank-stabilised" in build_parser()._subparsers._group_actions[0].choices["distill"].format_help()


def test_the_former_flat_keywords_still_work_with_a_warning():
    with pytest.warns(DeprecationWarning, match="lora_r, fused_lora, alpha"):
        old = DistillConfig(preset="neo", lora_r=8, fused_lora=False, alpha=0.3)
    assert old.lora == NEO_PRESET.lora_with(r=8, patch=False) and old.kd == NEO_PRESET.kd.replace(alpha=0.3)
    with pytest.warns(DeprecationWarning):
        tell = TellConfig(lora_r=4, lora_alpha=8.0, lora_dropout=0.0)
    assert tell.lora == LoraSettings(r=4, alpha=8.0, dropout=0.0)
    with pytest.raises(TypeError, match="give lora= or"), pytest.warns(DeprecationWarning):
        DistillConfig(lora=LoraSettings(), lora_r=8)
    with pytest.raises(RecipeError, match="rank r must be a positive int"), pytest.warns(DeprecationWarning):
        DistillConfig(lora_r=0)


def _reparse(tmp_path, command: str, config: dict, *extra: str):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"config_hash": "x", "config": config}))
    parser = build_parser()
    argv = [command, "--config", str(path), *extra]
    args = parser.parse_args(argv)
    return args.reparse_with_config(parser, argv, args)


#: the config of a manifest `tellneo distill --max-steps 2` wrote before the settings were composed
OLD_DISTILL = {
    "teacher": None, "student": None, "layers": "every_other", "data": None, "max_samples": 1200,
    "eval_samples": 24, "seq_len": 512, "mode": "lora", "preset": "neo", "lora_r": 8, "lora_alpha": None,
    "lora_dropout": None, "fused_lora": False, "alpha": 0.3, "temperature": None, "divergence": None, "beta": 0.5,
    "offline_topk": 0, "eval_batch_size": 4,
    "train": {"batch_size": 2, "grad_accum": 1, "max_steps": 2, "epochs": 1.0, "learning_rate": 0.0002,
              "lr_scheduler": "cosine", "warmup_ratio": 0.1, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0,
              "bf16": False, "gradient_checkpointing": False, "logging_steps": 1, "save_steps": 25,
              "save_total_limit": 2},
    "resolved_lora": {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear", "patch": False,
                      "backend": "auto", "extra": {}},
    "resolved_kd": {"alpha": 0.3, "temperature": 1.0, "divergence": "forward_kl", "beta": 0.5, "t2_scale": False,
                    "backend": "auto"},
    "data_sha256": None,
}


def test_manifests_of_the_former_shape_still_load(tmp_path):
    cfg = distill_cmd.config_from_args(_reparse(tmp_path, "distill", OLD_DISTILL))
    lora, kd, train = cfg.resolve()
    assert lora.to_dict() == {**OLD_DISTILL["resolved_lora"], "variant": "lora"}
    assert kd.__dict__ == OLD_DISTILL["resolved_kd"]
    assert (train.max_steps, train.learning_rate) == (2, 2e-4)
    old_tell = {"task": "date_iso", "lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.05, "fused_lora": False,
                "use_anchor": False, "train": {"max_steps": 2, "learning_rate": 1e-3}}
    tell = tell_cmd.config_from_args(_reparse(tmp_path, "tell", old_tell))
    assert tell.lora == LoraSettings(r=4, alpha=8.0, patch=False) and not tell.anchored


@pytest.mark.parametrize("mode", MODES)
def test_a_manifest_repeats_its_config_exactly(tmp_path, mode):
    cfg = DistillConfig(preset="neo", mode=mode, lora=NEO_PRESET.lora_with(r=8, variant="rslora", patch=False),
                        kd=KDSettings(alpha=0.7, divergence="jsd", beta=0.2), train=TrainSettings(max_steps=3))
    again = distill_cmd.config_from_args(_reparse(tmp_path, "distill", cfg.manifest()))
    assert again.manifest() == cfg.manifest()
    tell = TellConfig(mode=mode, lora=LoraSettings(r=4, variant="dora"), train=TrainSettings(max_steps=2))
    assert tell_cmd.config_from_args(_reparse(tmp_path, "tell", tell.manifest())).manifest() == tell.manifest()


def test_a_manifest_setting_without_a_flag_is_refused(tmp_path, capsys):
    from tellneo.cli import UserError

    config = DistillConfig(lora=LoraSettings(target_modules=("q_proj",))).manifest()
    with pytest.raises(UserError, match=r"unknown settings: lora\.target_modules"):
        _reparse(tmp_path, "distill", config)



def test_tell_answer_budget_comes_from_the_task():
    """json_record answers are ~35-48 tokens: the old fixed 16 cut every one off (scored 0 whatever the model did)."""
    from tellneo.data.tasks import JSON_RECORD, TASK_NAMES
    from tellneo.recipes.tell import FILE_TASK_NEW_TOKENS, TellConfig

    assert TellConfig(task="json_record").answer_tokens() == JSON_RECORD.max_new_tokens > 40
    assert TellConfig(task="date_iso").answer_tokens() == 16
    assert TellConfig(task_file="x.jsonl").answer_tokens() == FILE_TASK_NEW_TOKENS
    assert TellConfig(task="json_record", max_new_tokens=7).answer_tokens() == 7
    assert TellConfig(task="json_record").manifest()["max_new_tokens"] == JSON_RECORD.max_new_tokens
    with pytest.raises(RecipeError, match="max-new-tokens must be positive"):
        TellConfig(max_new_tokens=0).resolve()
    with pytest.raises(RecipeError, match="nope"):
        TellConfig(task="nope").answer_tokens()
    tell_help = build_parser()._subparsers._group_actions[0].choices["tell"].format_help()
    assert all(name in tell_help for name in TASK_NAMES)


def test_more_test_prompts_than_the_held_out_pool_is_a_recipe_error():
    from tellneo.data.tasks import HELD_OUT_POOL
    from tellneo.recipes.tell import TellConfig, task_data

    with pytest.raises(RecipeError, match="task date_iso: "):
        task_data(TellConfig(test_samples=HELD_OUT_POOL + 1))
