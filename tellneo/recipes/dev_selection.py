"""Best-of-k on a dev split: score the model at chosen optimizer steps of one run, keep the best checkpoint's
trainable weights, and put them back once training ends (SFT's pass count, ``tellneo tell --method sft
--exposures 4 8 16 32``).

Scores and the best weights live in the run directory (``dev_selection.json``, ``dev_best.pt``, both written
atomically), so a resumed run keeps what an interrupted one had scored; a fresh start (``--overwrite``, or
``--resume`` without a checkpoint) removes them with the run's other outputs. Ties go to the earlier checkpoint
(fewer passes). Under torchrun every process scores the dev split (the same greedy answers); the main one writes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from tellneo.io import atomic_write_bytes, atomic_write_text
from tellneo.recipes.run_dir import DEV_BEST as BEST_FILE
from tellneo.recipes.run_dir import DEV_SCORES as SCORES_FILE

__all__ = ["DevSelection", "SCORES_FILE", "BEST_FILE"]


class DevSelection(TrainerCallback):
    """Scores the model with ``score(model, label) -> {"accuracy", ...}`` at the optimizer steps of
    ``checkpoints`` (``{label k: step}``) and keeps the best trainable weights.

    Args:
        checkpoints: which step ends checkpoint ``k`` (e.g. ``k`` passes over the task samples).
        score: the dev evaluation (greedy answers on the dev prompts); its ``accuracy`` decides.
        out: the run directory (scores and best weights are kept there).
        is_main: whether this process writes the files.
    """

    def __init__(self, checkpoints: Mapping[int, int], score: Callable[[Any, str], dict[str, Any]], out: Path, *,
                 is_main: bool = True) -> None:
        if not checkpoints:
            raise ValueError("checkpoints must name at least one step")
        self.checkpoints = {int(k): int(s) for k, s in checkpoints.items()}
        self.at_step = {s: k for k, s in sorted(self.checkpoints.items(), reverse=True)}  # one step, lowest k
        self.score, self.out, self.is_main = score, Path(out), is_main
        path = self.out / SCORES_FILE
        self.scores: dict[int, dict[str, Any]] = {}
        if path.is_file():  # a resumed run: what was scored before the interruption
            self.scores = {int(k): v for k, v in json.loads(path.read_text())["scores"].items()}

    def best(self) -> int | None:
        """The checkpoint with the highest dev accuracy (ties: the earliest step, and of the checkpoints a step
        ends, the largest k: what that model was trained on), None before any is scored."""
        if not self.scores:
            return None
        return min(self.scores, key=lambda k: (-self.scores[k]["accuracy"], self.scores[k]["step"], -k))

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        k = self.at_step.get(state.global_step)
        if k is None or k in self.scores:
            return
        result = self.score(model, f"dev, checkpoint {k}")
        # steps that end several checkpoints (a tiny task set) score once, for every k they end
        for same in (j for j, s in self.checkpoints.items() if s == state.global_step):
            self.scores[same] = {"step": state.global_step, "accuracy": result["accuracy"],
                                 "correct": result["correct"], "n": result["n"],
                                 "metrics": result.get("metrics", {})}
        if self.is_main:
            if self.best() in self.scores and self.scores[self.best()]["step"] == state.global_step:
                buf = io.BytesIO()
                torch.save({n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
                           buf)
                atomic_write_bytes(self.out / BEST_FILE, buf.getvalue())
            atomic_write_text(self.out / SCORES_FILE, json.dumps(self.report(), indent=2))

    def report(self) -> dict[str, Any]:
        """``{"checkpoints", "scores", "chosen"}`` (``chosen``: the best k so far)."""
        return {"checkpoints": {str(k): s for k, s in self.checkpoints.items()},
                "scores": {str(k): v for k, v in sorted(self.scores.items())}, "chosen": self.best()}

    def restore_best(self, model: Any) -> int:
        """Load the best checkpoint's trainable weights into ``model``; returns its k. RuntimeError when a
        checkpoint was never scored (the run ended early) or its weights are missing."""
        missing = sorted(set(self.checkpoints) - set(self.scores))
        if missing:
            raise RuntimeError(f"dev selection: checkpoints {missing} were not scored (the run ended before their "
                               "steps); nothing to choose from honestly")
        best = self.best()
        path = self.out / BEST_FILE
        if not path.is_file():
            raise RuntimeError(f"dev selection: {path} is missing; rerun without --resume")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        params = dict(model.named_parameters())
        unknown = sorted(set(saved) - set(params))
        if unknown:
            raise RuntimeError(f"dev selection: {path} holds weights the model lacks, e.g. {unknown[0]}")
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        return best
