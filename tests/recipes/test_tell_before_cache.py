"""run_tell(before_cache=): the untrained model's test scores are generated once per (model, prompts, anchor)."""

from __future__ import annotations

import json

from tellneo.recipes import tell
from tellneo.recipes.tell import TellConfig, run_tell
from tellneo.recipes.training import TrainSettings
from tests.recipes.helpers import general_jsonl, one_thread, tiny_model_dir  # noqa: F401 (fixtures)


def test_before_scores_are_cached_by_what_they_depend_on(tmp_path, tiny_model_dir, general_jsonl, monkeypatch):
    cache = tmp_path / "cache"

    def run(name, **changes):
        cfg = TellConfig(model=str(tiny_model_dir), general=str(general_jsonl), task_samples=4, test_samples=3,
                         seq_len=256, max_new_tokens=3, exposures=1, output_dir=str(tmp_path / name),
                         train=TrainSettings(max_steps=1, seed=changes.pop("seed", 0)), **changes)
        return run_tell(cfg, progress=False, before_cache=cache)

    first = run("a")
    files = sorted(cache.glob("before-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["per_prompt"] == first["before"]["per_prompt"]
    second = run("b", general_per_task=2.0)  # another mix, the same untrained model and test prompts
    assert second["before"] == first["before"] and len(list(cache.glob("before-*.json"))) == 1
    run("c", use_anchor=False)  # another prompt prefix
    run("d", seed=1)  # another seed's test prompts
    assert len(list(cache.glob("before-*.json"))) == 3
    monkeypatch.setattr(tell, "_scoring_code_digest", lambda: "edited-scorer")  # the scoring code changed
    run("e")
    assert len(list(cache.glob("before-*.json"))) == 4
