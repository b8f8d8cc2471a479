"""`tellneo distill` after a failure: a NaN loss stops with one line naming the step and the last good checkpoint,
and a kill -9 while a checkpoint is being written leaves a run that ``--resume`` finishes. Both resumed runs must
end with exactly the adapter of an uninterrupted run (tiny random teacher, 4 steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tellneo.cli import main
from tests.cli.test_distill_cli import distill_args
from tests.recipes.helpers import one_thread, tiny_model_dir  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "general.jsonl"
    rows = [{"prompt": f"Tell me about the number {i}.",
             "response": f"The number {i} is " + "quite nice. " * (1 + i % 5)}
            for i in range(80)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data):
    """The uninterrupted run: (adapter tensors, [(step, loss)])."""
    from tests.recipes.helpers import _tiny_model_dir

    out = tmp_path_factory.mktemp("straight") / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(distill_args(_tiny_model_dir(), data, out)) == 0
    finally:
        torch.set_num_threads(previous)
    return load_file(out / "adapter" / "adapter_model.safetensors"), train_losses(out)


def train_losses(out):
    return [(r["step"], r["loss"]) for x in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in (r := json.loads(x))]


def assert_resumes_to_the_straight_run(out, tiny_model_dir, data, straight):
    assert main(distill_args(tiny_model_dir, data, out, "--resume")) == 0
    adapter, losses = straight
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == adapter.keys() and all(torch.equal(resumed[k], adapter[k]) for k in adapter)
    assert train_losses(out) == losses and [s for s, _ in losses] == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert not list(out.rglob(".staging-*"))


def test_nan_loss_stops_with_one_line_and_resume_finishes(tmp_path, tiny_model_dir, data, straight, monkeypatch,
                                                          capsys):
    from tellneo.recipes.neo import NeoTrainer

    compute = NeoTrainer.compute_loss

    def nan_at_step_3(self, model, inputs, *args, **kwargs):
        loss = compute(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 2 else loss

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(NeoTrainer, "compute_loss", nan_at_step_3)
        assert main(distill_args(tiny_model_dir, data, out)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and sum("error" in line for line in lines) == 1, err
    assert lines[-1].startswith("tellneo distill: error: non-finite loss nan at step 3; training stopped before "
                                "applying that step, and the last good checkpoint is "), lines[-1]
    assert lines[-1].split(", and the last good checkpoint is ")[1].split(":")[0].endswith("checkpoint-2")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    assert_resumes_to_the_straight_run(out, tiny_model_dir, data, straight)


KILL_WHILE_SAVING = """
import os, signal, sys
import transformers
save = transformers.Trainer._save_optimizer_and_scheduler
def killed_midway(self, output_dir):
    if self.state.global_step == 4:  # the model of checkpoint-4 is written, its optimizer state is not
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, output_dir)
transformers.Trainer._save_optimizer_and_scheduler = killed_midway
from tellneo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_while_writing_a_checkpoint_then_resume(tmp_path, tiny_model_dir, data, straight):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, *distill_args(tiny_model_dir, data, out),
                           "--threads", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    checkpoints = out / "checkpoints"
    staged = list(checkpoints.glob(".staging-checkpoint-4/checkpoint-4/*"))
    assert staged and not (checkpoints / "checkpoint-4").exists()  # killed inside the write, which was staged
    assert (checkpoints / "checkpoint-2" / "trainer_state.json").is_file()
    assert_resumes_to_the_straight_run(out, tiny_model_dir, data, straight)
