"""``kernels/`` (installed as ``tellneo.kernels``) sits below ``tellneo.ops``: no kernel module imports any other
part of tellneo, so the kernels can be read, tested and reused on their own, and ``tellneo.ops`` is the only
place that knows both."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
MODULES = sorted(p.stem for p in KERNELS.glob("*.py") if p.stem != "__init__")


def _absolute_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return names


def test_kernel_sources_import_nothing_from_tellneo():
    assert MODULES, KERNELS
    offenders = {p.name: [n for n in _absolute_imports(p) if n == "tellneo" or n.startswith("tellneo.")]
                 for p in sorted(KERNELS.glob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}


_PROBE = r"""
import importlib, sys
before = set(sys.modules)
for name in sys.argv[1:]:
    importlib.import_module("tellneo.kernels." + name)
loaded = sorted(m for m in set(sys.modules) - before if m == "tellneo" or m.startswith("tellneo."))
print("\n".join(loaded))
"""


def test_importing_every_kernel_module_loads_no_other_tellneo_module():
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", _PROBE, *MODULES], capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(proc.stdout.split())
    assert {f"tellneo.kernels.{m}" for m in MODULES} <= loaded  # the probe did import them
    assert loaded - {"tellneo", "tellneo.kernels"} - {f"tellneo.kernels.{m}" for m in MODULES} == set()


def test_divergence_codes_follow_the_ops_names():
    pytest.importorskip("triton")
    import tellneo.kernels.fused_linear_kd as K
    from tellneo.ops import DIVERGENCES

    assert (K.FORWARD_KL, K.REVERSE_KL, K.JSD) == tuple(DIVERGENCES.index(n) for n in ("forward_kl", "reverse_kl",
                                                                                           "jsd"))
