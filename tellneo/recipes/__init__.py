"""The TELL and LLM-NEO recipes inside the Hugging Face ``transformers`` + ``peft`` training loop.

Modules (imported on use; nothing heavy happens when importing this package):

* :mod:`tellneo.recipes.neo` — ``build_student`` (layer-dropped teacher copy), ``check_compatible``,
  ``KDSettings``, ``NEO_PRESET`` and ``NeoTrainer`` (fused KD from hidden states; also the CE-only trainer).
* :mod:`tellneo.recipes.offline` — the teacher's top-k log-probabilities precomputed to disk, and the dataset /
  collator that feed them to ``NeoTrainer`` without the teacher.
* :mod:`tellneo.recipes.evaluate` — held-out CE, KL to the teacher, top-1 agreement; task accuracy (TELL).
* :mod:`tellneo.recipes.distill` — ``run_distill(DistillConfig)``, the run behind ``tellneo distill``.
* :mod:`tellneo.recipes.tell` — ``run_tell(TellConfig)``, the run behind ``tellneo tell`` (TELL, the SFT baseline
  and the ablations).
* :mod:`tellneo.recipes.common`, :mod:`~tellneo.recipes.training`, :mod:`~tellneo.recipes.trainer_utils`,
  :mod:`~tellneo.recipes.records`, :mod:`~tellneo.recipes.reporting` — LoRA attachment, training flags and the
  run-directory protocol, atomic checkpoints and Ctrl-C handling, data loading, run outputs.

A NEO run in Python::

    from tellneo.models import load_causal_lm
    from tellneo.recipes.common import LoraSettings, attach_lora
    from tellneo.recipes.neo import NEO_PRESET, NeoTrainer, build_student

    teacher, tokenizer = load_causal_lm()                 # the embedded SmolLM2-135M-Instruct
    student = attach_lora(build_student(teacher, "every_other"), NEO_PRESET.lora)
    trainer = NeoTrainer(model=student, args=training_args, train_dataset=packed_rows,
                         data_collator=PackedCollator(), teacher=teacher, kd=NEO_PRESET.kd)
    trainer.train()
"""
