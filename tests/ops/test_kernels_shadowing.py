"""The checkout's ``kernels/`` directory must not hide the Hugging Face ``kernels`` distribution.

``python -m pytest`` and ``python -m benchmarks...`` put the checkout root on ``sys.path``, where ``kernels/``
(the source of ``tellneo.kernels``) would shadow the Hub's ``kernels`` package that ``transformers`` >= 5.25
depends on and imports names from. ``kernels/__init__.py`` hands a top-level import over to the installed one.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_in_checkout(code: str, *, extra_path: Path | None = None, no_site: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    args = [sys.executable, *(["-S"] if no_site else []), "-c", code]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_top_level_import_reaches_an_installed_kernels_package(tmp_path: Path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '0.19.1'\nCUDAProperties = 'installed'\n")
    (fake / "layer.py").write_text("WHERE = 'installed submodule'\n")
    proc = _run_in_checkout("import kernels, kernels.layer; print(kernels.CUDAProperties, kernels.layer.WHERE, "
                            "kernels.__file__)", extra_path=tmp_path, no_site=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("installed installed submodule"), proc.stdout
    assert str(fake) in proc.stdout


def test_without_an_installed_package_the_checkout_module_stays_and_has_no_version():
    proc = _run_in_checkout("import kernels; print(kernels.__file__, hasattr(kernels, '__version__'))",
                            no_site=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(ROOT / "kernels" / "__init__.py"), "False"]


def test_tellneo_kernels_is_still_the_checkout_source():
    proc = _run_in_checkout("import tellneo.kernels as k; print(k.__file__, hasattr(k, 'CUDAProperties'))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[1] == "False"
    assert Path(proc.stdout.split()[0]).parent.name == "kernels"


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_transformers_model_classes_import_inside_the_checkout():
    proc = _run_in_checkout("import transformers.modeling_utils, transformers; "
                            "from transformers import LlamaForCausalLM; print('ok')")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"
