"""The TELL and LLM-NEO recipes inside the Hugging Face ``transformers`` + ``peft`` training loop.

Modules (imported on use; nothing heavy happens when importing this package):

* :mod:`tellneo.recipes.neo` — ``build_student`` (layer-dropped teacher copy), ``check_compatible`` and
  ``KDTrainer`` (alias ``NeoTrainer``: fused CE + KD from hidden states; with KD weight 0 and no teacher, the
  CE-only trainer TELL uses).
* :mod:`tellneo.recipes.settings` — ``KDSettings``, the distillation presets (``PRESETS``: ``DEFAULT_PRESET``,
  ``NEO_PRESET``) and the recipes' other constants (importable without loading transformers).
* :mod:`tellneo.recipes.lora` — ``LoraSettings`` (the LoRA defaults, ``LORA_VARIANTS``) and ``attach_lora``.
* :mod:`tellneo.recipes.offline` — the teacher's top-k log-probabilities precomputed to disk, and the dataset /
  collator that feed them to ``KDTrainer`` without the teacher.
* :mod:`tellneo.recipes.evaluate` — held-out CE, KL to the teacher, top-1 agreement; task accuracy (TELL).
* :mod:`tellneo.recipes.distill` — ``run_distill(DistillConfig)``, the run behind ``tellneo distill``.
* :mod:`tellneo.recipes.tell` — ``run_tell(TellConfig)``, the run behind ``tellneo tell`` (TELL, the SFT baseline
  and the ablations).
* :mod:`tellneo.recipes.run` — the run skeleton both use (load, evaluate, train, evaluate, summary).
* :mod:`tellneo.recipes.training` — ``TrainSettings`` and what the recipes add to the ``Trainer`` (atomic
  checkpoints, Ctrl-C handling, non-finite stops, ``metrics.jsonl``); :mod:`tellneo.recipes.run_dir` — the
  run-directory protocol; :mod:`tellneo.recipes.model_parts` — decoder body, output head, hidden states;
  :mod:`tellneo.recipes.records`, :mod:`tellneo.recipes.reporting`, :mod:`tellneo.recipes.outputs` — data
  loading, run reports, saved models; :mod:`tellneo.recipes.errors` — ``RecipeError``.
  (:mod:`tellneo.recipes.common` and :mod:`tellneo.recipes.trainer_utils` re-export the names they used to hold.)

A NEO run in Python::

    from tellneo.recipes.distill import DistillConfig, run_distill

    summary = run_distill(DistillConfig(preset="neo"))    # the same run as `tellneo distill --preset neo`

or by hand::

    from tellneo.models import load_causal_lm
    from tellneo.recipes.lora import attach_lora
    from tellneo.recipes.neo import KDTrainer, build_student
    from tellneo.recipes.settings import NEO_PRESET

    teacher, tokenizer = load_causal_lm()                 # the embedded SmolLM2-135M-Instruct
    student = attach_lora(build_student(teacher, "every_other"), NEO_PRESET.lora)
    trainer = KDTrainer(model=student, args=training_args, train_dataset=packed_rows,
                        data_collator=PackedCollator(), teacher=teacher, kd=NEO_PRESET.kd)
    trainer.train()
"""
