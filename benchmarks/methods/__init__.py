"""Method experiments: does tellneo's NEO beat plain LoRA SFT, and does its TELL beat SFT per task token?

``python -m benchmarks.bench_methods`` (or ``tellneo bench methods``) runs every arm of both experiments through
the public recipes (:func:`tellneo.recipes.distill.run_distill`, :func:`tellneo.recipes.tell.run_tell`), each
arm in its own process (so its peak memory is its own), and writes CSV + PNG + a README under
``benchmarks/results/methods/``. Finished arms are reused: an interrupted sweep resumes where it stopped.
"""
