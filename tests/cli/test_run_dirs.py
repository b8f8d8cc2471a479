"""Run directories that cannot be half-overwritten, stale or shared (issue 20), one test per failure found:
changed inputs, --overwrite leftovers, interrupted overwrites, concurrent runs, validation before deletion,
resume after a data change, silently dropped records, torn metrics / checkpoints, nonsense flags, file modes,
stale temporary files, NaN in JSON and path checks before loading."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tellneo.cli import main
from tests.recipes.helpers import general_jsonl, one_thread, tiny_model_dir  # noqa: F401 (fixtures)

TELLNEO = Path(sys.executable).parent / "tellneo"  # the console script of this environment


def strict_json(path: Path):
    """json.loads that refuses NaN / Infinity (which the JSON standard does not have)."""
    def refuse(token):
        raise ValueError(f"{path}: non-standard JSON constant {token}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([str(TELLNEO), *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert "error: " in lines[0] and message in lines[0], lines[0]


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process that holds ``path``'s run-directory lock until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tellneo.io import lock_run_dir; lock_run_dir(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(600)", str(path)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def general_rows(n: int, tag: str = ""):
    return [{"prompt": f"Say the number {i} in words{tag}.", "response": f"The number is {i}. " * (1 + i % 7)}
            for i in range(n)]


def shard_rows(out: Path) -> int:
    return sum(np.load(s)["input_ids"].shape[0] for s in out.glob("epoch-*/shard-*.npz"))


def mix_args(general: Path, out: Path, *extra: str) -> list[str]:
    return ["mix", "--general", str(general), "--task-samples", "8", "--seq-len", "256", "--task-ratio", "0.1",
            "--rows-per-shard", "4", "--output-dir", str(out), *extra]


# ------------------------------------------------------------------------------------------------ tellneo mix
def test_mix_rerun_after_input_contents_changed_is_a_different_run(tmp_path, capsys):
    general = write_jsonl(tmp_path / "general.jsonl", general_rows(200))
    out = tmp_path / "mix"
    assert main(mix_args(general, out)) == 0
    first = np.load(out / "epoch-000" / "shard-00000.npz")["input_ids"]
    write_jsonl(general, general_rows(200, tag=" please"))  # same path, other contents
    assert main(mix_args(general, out)) == 2
    err = capsys.readouterr().err
    assert "holds a different run" in err and "sha256.general" in err and "--overwrite" in err
    assert main(mix_args(general, out, "--overwrite")) == 0
    stats = strict_json(out / "stats.json")
    assert stats["epochs"][0]["shards_reused"] == 0
    assert not np.array_equal(np.load(out / "epoch-000" / "shard-00000.npz")["input_ids"], first)
    assert shard_rows(out) == stats["epochs"][0]["rows"]


def test_mix_overwrite_with_a_smaller_input_leaves_no_old_shards(tmp_path):
    out = tmp_path / "mix"
    assert main(mix_args(write_jsonl(tmp_path / "big.jsonl", general_rows(300)), out, "--epochs", "2")) == 0
    assert main(mix_args(write_jsonl(tmp_path / "small.jsonl", general_rows(20)), out, "--overwrite")) == 0
    stats = strict_json(out / "stats.json")
    assert [e["epoch"] for e in stats["epochs"]] == [0] and sorted(p.name for p in out.glob("epoch-*")) == ["epoch-000"]
    assert shard_rows(out) == stats["epochs"][0]["rows"]


def test_mix_truncation_reports_the_trained_tokens_on_disk(tmp_path, capsys):
    rows = [{"prompt": "Repeat after me: " + "lorem ipsum " * (40 if i % 2 else 2), "response": f"done {i}."}
            for i in range(40)]
    out = tmp_path / "mix"
    # --no-anchor: the anchored task samples alone exceed 64 tokens, and a mix that would cut every one is refused
    assert main(mix_args(write_jsonl(tmp_path / "long.jsonl", rows), out, "--seq-len", "64", "--no-anchor")) == 0
    assert "keep no trained token" in capsys.readouterr().out
    (epoch,) = strict_json(out / "stats.json")["epochs"]
    on_disk = sum(int((np.load(s)["labels"] != -100).sum()) for s in out.glob("epoch-000/shard-*.npz"))
    assert epoch["trained_tokens"] == on_disk
    assert epoch["truncated_samples"] >= 20 and epoch["samples_without_trained_tokens"] >= 20


def test_mix_files_get_the_umask_mode_and_stale_tmp_files_go(tmp_path):
    general = write_jsonl(tmp_path / "general.jsonl", general_rows(100))
    out = tmp_path / "mix"
    old = os.umask(0o022)
    try:
        assert main(mix_args(general, out)) == 0
    finally:
        os.umask(old)
    for name in ("stats.json", "manifest.json", "dispersion.png", "epoch-000/shard-00000.npz"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    stale = out / "epoch-000" / ".shard-00001.npz.k1ll3d.tmp"  # what a kill -9 inside an atomic write leaves
    stale.write_bytes(b"half a shard")
    assert main(mix_args(general, out)) == 0  # same run: resumed, shards reused
    assert not stale.exists() and not list(out.rglob("*.tmp"))


def test_mix_seq_len_is_bounded(tmp_path, capsys):
    assert main(["mix", "--seq-len", "1000000000", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--seq-len must be at most" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- lock on the dir
def test_a_second_run_into_a_locked_directory_refuses_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "mix"
    holder = hold_lock(out)
    try:
        general = write_jsonl(tmp_path / "general.jsonl", general_rows(50))
        assert_one_line_error(cli(*mix_args(general, out)), "is in use by another running tellneo process")
        assert not (out / "manifest.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel releases the flock
        holder.wait()
    from tellneo.io import lock_run_dir, release_run_dirs

    try:
        lock_run_dir(out)
    finally:
        release_run_dirs()


def test_distill_refuses_a_locked_directory_before_loading_anything(tmp_path, tiny_model_dir, general_jsonl,
                                                                       monkeypatch, capsys):
    import tellneo.models

    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        monkeypatch.setattr(tellneo.models, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
        assert main(distill_args(tiny_model_dir, general_jsonl, out)) == 2
        assert "is in use by another running tellneo process" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# ------------------------------------------------------------------------------------------- tellneo distill
def distill_args(tiny_model_dir, data, out, *extra):
    return ["distill", "--teacher", str(tiny_model_dir), "--data", str(data), "--max-samples", "60",
            "--eval-samples", "8", "--seq-len", "128", "--max-steps", "4", "--save-steps", "2", "--lr", "1e-2",
            "--output-dir", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step distill run on the tiny teacher (checkpoint-2, checkpoint-4) and its data; tests copy it."""
    from tests.recipes.helpers import _tiny_model_dir

    root = tmp_path_factory.mktemp("finished")
    data = write_jsonl(root / "general.jsonl",
                       [{"prompt": f"Tell me about the number {i}.", "response": f"The number {i} is " +
                         "quite nice. " * (1 + i % 5)} for i in range(80)])
    out = root / "run"
    assert main(distill_args(_tiny_model_dir(), data, out)) == 0
    return out, data


def copy_run(finished_run, tmp_path):
    """A copy of the finished run (the data file is shared: its path is part of the run's config; do not change it)."""
    out, data = finished_run
    shutil.copytree(out, tmp_path / "run")
    return tmp_path / "run", data


def test_overwrite_interrupted_early_leaves_none_of_the_old_run(tmp_path, tiny_model_dir, finished_run,
                                                                 monkeypatch, capsys):
    import tellneo.recipes.evaluate

    out, data = copy_run(finished_run, tmp_path)
    assert (out / "summary.json").is_file() and (out / "adapter").is_dir()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tellneo.recipes.evaluate, "distill_metrics", interrupted)  # Ctrl-C right after the start
    assert main(distill_args(tiny_model_dir, data, out, "--alpha", "0.9", "--overwrite")) == 130
    assert strict_json(out / "manifest.json")["config"]["kd"]["alpha"] == 0.9
    left = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert left == ["manifest.json"], left  # no old summary, adapter, plot, metrics or checkpoints


def test_offline_topk_overwrite_validates_first_then_replaces(tmp_path, tiny_model_dir, general_jsonl, capsys):
    out = tmp_path / "offline"
    assert main(distill_args(tiny_model_dir, general_jsonl, out, "--offline-topk", "4")) == 0
    summary = strict_json(out / "summary.json")  # valid JSON although there is no teacher CE offline
    assert summary["before"]["teacher_ce"] is None
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())

    broken = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "a"}])
    assert main(distill_args(tiny_model_dir, broken, out, "--offline-topk", "8", "--overwrite")) == 2
    assert "broken.jsonl" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints  # nothing deleted
    assert (out / "metrics.jsonl").is_file() and (out / "summary.json").is_file()

    assert main(distill_args(tiny_model_dir, general_jsonl, out, "--offline-topk", "8", "--overwrite")) == 0
    assert strict_json(out / "teacher_topk" / "train" / "manifest.json")["config"]["k"] == 8
    assert strict_json(out / "summary.json")["steps"] == 4


def test_resume_after_the_data_file_changed_refuses_and_says_what(tmp_path, tiny_model_dir, general_jsonl, capsys):
    out, data = tmp_path / "run", general_jsonl
    assert main(distill_args(tiny_model_dir, data, out, "--max-steps", "2")) == 0
    (out / "summary.json").unlink()  # as if interrupted after its checkpoint
    stamp = (out / "metrics.jsonl").read_bytes()
    with data.open("a") as f:
        f.write(json.dumps({"prompt": "One more?", "response": "Yes, one more."}) + "\n")
    assert main(distill_args(tiny_model_dir, data, out, "--max-steps", "2", "--resume")) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "data_sha256" in err and "holds a different run" in err
    assert (out / "metrics.jsonl").read_bytes() == stamp


def test_resume_and_overwrite_together_are_refused(tmp_path, tiny_model_dir, finished_run, capsys):
    out, data = copy_run(finished_run, tmp_path)
    assert main(distill_args(tiny_model_dir, data, out, "--resume", "--overwrite")) == 2
    assert "--resume and --overwrite contradict each other" in capsys.readouterr().err
    assert (out / "summary.json").is_file()


def test_torn_metrics_line_and_truncated_trainer_state_fall_back(tmp_path, tiny_model_dir, finished_run, caplog):
    out, data = copy_run(finished_run, tmp_path)
    (out / "summary.json").unlink()
    state = out / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # truncated: the resume falls back to checkpoint-2
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a partial last line (disk full)
    assert main(distill_args(tiny_model_dir, data, out, "--resume")) == 0
    assert "trainer_state.json is unreadable" in caplog.text and "dropping a torn last line" in caplog.text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert strict_json(out / "summary.json")["steps"] == 4
    assert json.loads(state.read_text())["global_step"] == 4  # rewritten by the resumed run


def long_record(i: int) -> dict:
    return {"prompt": f"Recite item {i}.", "response": "This answer is far too long for the row. " * 30}


def test_records_longer_than_seq_len_are_counted_and_a_shrunken_held_out_set_refused(
        tmp_path, tiny_model_dir, capsys, caplog):
    from tellneo.recipes.records import split_records

    rows = [{"prompt": f"Tell me about the number {i}.", "response": f"The number {i} is nice."} for i in range(60)]
    eval_ids = sorted(r["i"] for r in split_records([{"i": i} for i in range(60)], 8, seed=0)[1])
    train_ids = [i for i in range(60) if i not in eval_ids]

    some_train_long = [long_record(i) if i in train_ids[:5] else r for i, r in enumerate(rows)]
    out = tmp_path / "counted"
    assert main(distill_args(tiny_model_dir, write_jsonl(tmp_path / "a.jsonl", some_train_long), out)) == 0
    assert "dropped 5 of 52 training and 0 of 8 held-out records" in caplog.text
    s = strict_json(out / "summary.json")
    assert (s["train_records"], s["eval_records"], s["records_dropped_overlong"]) == (47, 8, {"train": 5, "eval": 0})

    most_eval_long = [long_record(i) if i in eval_ids[:5] else r for i, r in enumerate(rows)]
    out = tmp_path / "refused"
    assert main(distill_args(tiny_model_dir, write_jsonl(tmp_path / "b.jsonl", most_eval_long), out)) == 2
    err = capsys.readouterr().err
    assert "only 3 of 8 held-out records fit in --seq-len 128 tokens" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()


def test_a_wrong_student_path_is_reported_before_the_teacher_loads(tmp_path, tiny_model_dir, general_jsonl,
                                                                   monkeypatch, capsys):
    import tellneo.models

    monkeypatch.setattr(tellneo.models, "load_causal_lm", lambda *a, **k: pytest.fail("the teacher was loaded"))
    args = distill_args(tiny_model_dir, general_jsonl, tmp_path / "o", "--student", str(tmp_path / "no-student"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "student path" in err and "no-student does not exist" in err


# ------------------------------------------------------------------------------------------- argument bounds
NONSENSE = [
    ("distill", ["--learning-rate", "inf"], "learning-rate must be a finite number > 0, got inf"),
    ("distill", ["--learning-rate", "nan"], "learning-rate must be a finite number > 0, got nan"),
    ("distill", ["--learning-rate", "0"], "learning-rate must be a finite number > 0, got 0.0"),
    ("distill", ["--threads", "4096"], "--threads must be in [0, "),
    ("distill", ["--max-grad-norm", "nan"], "max-grad-norm must be a finite number >= 0"),
    ("distill", ["--weight-decay", "-1"], "weight-decay must be a finite number >= 0, got -1.0"),
    ("distill", ["--save-total-limit", "0"], "save-total-limit must be at least 1"),
    ("distill", ["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    ("distill", ["--seq-len", "1000000000"], "seq-len must be in [16, 1048576], got 1000000000"),
    ("distill", ["--seq-len", "1e9"], "argument --seq-len: invalid int value: '1e9'"),
    ("tell", ["--learning-rate", "-1"], "learning-rate must be a finite number > 0"),
    ("tell", ["--threads", "4096"], "--threads must be in [0, "),
    ("tell", ["--seq-len", "1000000000"], "seq-len must be at most 1048576"),
    ("tell", ["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
]


@pytest.mark.parametrize("command, flags, message", NONSENSE)
def test_nonsense_flags_are_refused_with_one_line(tmp_path, capsys, command, flags, message):
    out = tmp_path / "never"
    try:
        code = main([command, "--output-dir", str(out), "--quiet", *flags])
    except SystemExit as exc:  # argparse's own errors exit from inside main()
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not out.exists()


# the console script itself (a subprocess each: slow on a loaded machine, so one case of each kind)
@pytest.mark.parametrize("command, flags, message", [NONSENSE[i] for i in (0, 3, 7, 9)])
def test_nonsense_flags_are_refused_by_the_console_script(tmp_path, command, flags, message):
    out = tmp_path / "never"
    assert_one_line_error(cli(command, "--output-dir", str(out), "--quiet", *flags), message)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ unit level
def test_plan_seq_len_is_bounded():
    from tellneo.data import plan
    from tellneo.data.planning import MAX_SEQ_LEN

    with pytest.raises(ValueError, match="seq_len must be a positive int of at most"):
        plan([3], 10**9)
    assert plan([3], MAX_SEQ_LEN).num_rows == 1


def test_atomic_writes_follow_the_umask_and_json_is_always_valid(tmp_path):
    from tellneo.io import atomic_write_text, to_json

    old = os.umask(0o027)
    try:
        assert atomic_write_text(tmp_path / "a.txt", "x").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    text = to_json({"loss": float("nan"), "ppl": [float("inf"), 1.5], "t": (float("-inf"),)})
    assert json.loads(text) == {"loss": None, "ppl": [None, 1.5], "t": [None]}


def test_read_metrics_drops_a_torn_last_line_only(tmp_path):
    from tellneo.recipes.common import RecipeError
    from tellneo.recipes.trainer_utils import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(RecipeError, match="metrics.jsonl:2: not a metrics record"):
        read_metrics(path)


def test_last_checkpoint_skips_an_unreadable_trainer_state(tmp_path):
    from tellneo.recipes.trainer_utils import last_checkpoint

    for step, state in ((2, '{"global_step": 2}'), (10, '{"global_step": 10}'), (12, '{"global_st')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-20").mkdir()  # no state at all
    assert last_checkpoint(tmp_path).name == "checkpoint-10"  # numeric order, not 'checkpoint-2' > '...-10'
    assert last_checkpoint(tmp_path / "none") is None


def test_prepare_run_dir_deletes_old_outputs_before_the_new_manifest(tmp_path, monkeypatch):
    import tellneo.io as io

    run = tmp_path / "run"
    io.prepare_run_dir(run, {"a": 1}, outputs=("epoch-*", "stats.json"))
    (run / "epoch-000").mkdir()
    (run / "epoch-000" / "shard-00000.npz").write_bytes(b"old")
    (run / "stats.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"holds a different run \(changed: a 1 -> 2\)"):
        io.prepare_run_dir(run, {"a": 2}, outputs=("epoch-*", "stats.json"))
    assert (run / "stats.json").exists()  # a refusal deletes nothing

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(io, "atomic_write_text", killed)  # interrupted while writing the new manifest
        with pytest.raises(KeyboardInterrupt):
            io.prepare_run_dir(run, {"a": 2}, overwrite=True, outputs=("epoch-*", "stats.json"))
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["manifest.json"]
    assert json.loads((run / "manifest.json").read_text())["config"] == {"a": 1}  # the old run, without its outputs

    (run / "manifest.json").unlink()
    (run / "stats.json").write_text("{}")
    with pytest.raises(FileExistsError, match="holds stats.json without a manifest"):
        io.prepare_run_dir(run, {"a": 2}, outputs=("epoch-*", "stats.json"))
    io.release_run_dirs()


def test_tell_counts_what_seq_len_drops(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Tell me about the number {i}.", "response": f"The number {i} is nice."} for i in range(70)]
    rows += [long_record(i) for i in range(10)]
    general = write_jsonl(tmp_path / "general.jsonl", rows)
    out = tmp_path / "tell"
    assert main(["tell", "--model", str(tiny_model_dir), "--general", str(general), "--task-samples", "8",
                 "--test-samples", "4", "--seq-len", "256", "--max-steps", "2", "--max-new-tokens", "4",
                 "--general-samples", "0", "--task-ratio", "0.2", "--output-dir", str(out), "--quiet"]) == 0
    overlong = strict_json(out / "summary.json")["overlong"]
    assert overlong == {"general_records_dropped": 10, "task_samples_truncated": 0}
