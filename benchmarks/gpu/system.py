"""The campaign's non-benchmark stages: environment report, peer wheels, CUDA build, GPU tests.

Nothing here imports ``tellneo`` submodules that load the native extension: the build stage may (re)build
``tellneo._C``, and a process that already tried to import it would keep the old answer. The extension is
probed in child processes instead.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WHEELS = ROOT / "wheels" / "gpu"


@dataclass(frozen=True)
class Requirement:
    """A distribution the campaign may need, with the minimum version and what it is needed for."""

    dist: str
    minimum: str | None
    purpose: str
    executable: str | None = None  # satisfied by this program on PATH as well (cmake, ninja)


# Peers measured against (pure-Python wheels; their own deps torch/triton are on the GPU image).
PEERS = [
    Requirement("liger-kernel", "0.5", "kd stage: liger, liger+compile"),
    Requirement("cut-cross-entropy", None, "ce stage: cut-cross-entropy"),
    Requirement("trl", "0.20", "TRL peer tests/benchmarks outside the campaign (needs datasets to import)"),
]
# What the GPU tests need to be collected and run (the test files with GPU tests import hypothesis).
TEST_TOOLS = [
    Requirement("pytest", "8", "tests stage"),
    Requirement("pluggy", None, "pytest"),
    Requirement("iniconfig", None, "pytest"),
    Requirement("pygments", None, "pytest"),
    Requirement("hypothesis", "6.100", "tests stage (tests/ops/test_fused_linear_kd.py imports it)"),
    Requirement("sortedcontainers", None, "hypothesis"),
] + ([Requirement("exceptiongroup", None, "pytest on Python 3.10"), Requirement("tomli", None, "pytest on Python 3.10")]
     if sys.version_info < (3, 11) else [])
# What `pip install --no-build-isolation -e .` needs in the running environment (pyproject's build-system).
BUILD_TOOLS = [
    Requirement("setuptools", "77", "building tellneo._C (license metadata needs setuptools >= 77)"),
    Requirement("wheel", None, "building tellneo._C"),
    Requirement("pybind11", "2.12", "building tellneo._C"),
    Requirement("cmake", "3.18", "building tellneo._C", executable="cmake"),
    Requirement("ninja", None, "building tellneo._C (optional: make is used without it)", executable="ninja"),
]


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece else ""
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing(requirements: list[Requirement]) -> list[Requirement]:
    """The requirements neither installed at >= their minimum nor (where allowed) found on PATH."""
    out = []
    for r in requirements:
        v = installed_version(r.dist)
        if v is not None and (r.minimum is None or _version_tuple(v) >= _version_tuple(r.minimum)):
            continue
        if r.executable and shutil.which(r.executable):
            continue
        out.append(r)
    return out


def pip_install_command(names: list[str], wheels: Path, *, dry_run: bool) -> list[str]:
    """``pip install --no-index --find-links WHEELS --no-deps NAMES`` (``--dry-run``: resolve only)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "--no-deps"]
    return cmd + (["--dry-run"] if dry_run else []) + names


def _run(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None, cwd: Path = ROOT
         ) -> subprocess.CompletedProcess[str]:
    print("  $ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=max(1.0, timeout_s))
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    for line in tail:
        print("    " + line, flush=True)
    return proc


# ----------------------------------------------------------------------------------------------- env
def nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"


def nvcc_path() -> str | None:
    """nvcc as setup.py finds it: CUDA_HOME/bin, PATH, /usr/local/cuda/bin."""
    home = os.environ.get("CUDA_HOME")
    for cand in ([Path(home) / "bin" / "nvcc"] if home else []):
        if cand.is_file():
            return str(cand)
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def environment() -> dict[str, Any]:
    """Device, driver and library versions (printed first, saved as env.json)."""
    import torch

    from tellneo.bench import cpu_device_name, git_commit

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_device_name(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "nvidia_smi": nvidia_smi(),
        "nvcc": nvcc_path(),
        "commit": git_commit(ROOT),
        "flags": {k: os.environ[k] for k in ("TRITON_INTERPRET", "TORCHDYNAMO_DISABLE", "TELLNEO_BACKEND",
                                             "TELLNEO_CUDA", "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }
    for dist in ("triton", "transformers", "peft", "accelerate", "numpy", *(r.dist for r in PEERS)):
        env[dist] = installed_version(dist)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env["device"] = env["cpu"]
    return env


# ----------------------------------------------------------------------------------------------- peers
def install_peers(wheels: Path, *, dry_run: bool, timeout_s: float) -> tuple[str, str]:
    """Install the missing peers and build tools from ``wheels`` (offline). Returns (status, reason)."""
    need = missing(PEERS + TEST_TOOLS + BUILD_TOOLS)
    if not need:
        return "ok", "all peers and build tools already installed"
    names = [r.dist for r in need]
    if not wheels.is_dir():
        return "skipped", (f"missing {names} and no wheel folder {wheels} (run scripts/fetch-gpu-wheels.sh and "
                           "carry it); stages needing them skip their cells")
    have = {p.name.split("-")[0].replace("_", "-").lower() for p in wheels.glob("*.whl")}
    installable = [n for n in names if n.lower() in have]
    absent = sorted(set(names) - set(installable))
    if not installable:
        return "skipped", f"missing {names}; none has a wheel in {wheels}"
    proc = _run(pip_install_command(installable, wheels, dry_run=dry_run), timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install from {wheels} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    verb = "would install (pip --dry-run)" if dry_run else "installed"
    note = f"; no wheel for {absent}" if absent else ""
    return ("ok" if not absent else "partial"), f"{verb} {installable} from {wheels}{note}"


# ----------------------------------------------------------------------------------------------- build
def native_build_info(timeout_s: float = 120) -> dict[str, Any] | None:
    """``tellneo._C.build_info()`` probed in a fresh interpreter (None when the extension does not import)."""
    code = "import json, tellneo._C as c; print(json.dumps(c.build_info()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_command() -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(ROOT)]


def build_extension(*, dry_run: bool, cuda: bool, timeout_s: float, capability: str | None) -> tuple[str, str]:
    """(Re)build tellneo._C when it is missing, or lacks CUDA while nvcc and a GPU are present."""
    info = native_build_info()
    nvcc = nvcc_path()
    want_cuda = cuda and nvcc is not None
    env = dict(os.environ, TELLNEO_CUDA="1" if want_cuda else "0")
    if want_cuda and capability and "TELLNEO_CUDA_ARCHS" not in env:
        env["TELLNEO_CUDA_ARCHS"] = capability.replace(".", "")  # only this GPU's architecture: faster build
    cmd = build_command()
    flags = " ".join(f"{k}={env[k]}" for k in ("TELLNEO_CUDA", "TELLNEO_CUDA_ARCHS") if k in env)
    if info is not None and (bool(info.get("cuda")) or not want_cuda):
        why = "" if info.get("cuda") or not cuda else " (without CUDA: no nvcc, the CUDA emit cells will fail)"
        return "ok", f"tellneo._C already built{why}: {info}"
    if dry_run:
        return "skipped", f"dry run: would run `{flags} {' '.join(cmd)}` (tellneo._C: {info or 'not built'})"
    proc = _run(cmd, timeout_s, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"building tellneo._C failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    info = native_build_info()
    if info is None:
        raise RuntimeError("tellneo._C still does not import after the build")
    return "ok", f"built tellneo._C: {info}"


# ----------------------------------------------------------------------------------------------- tests
def gpu_test_files(root: Path = ROOT) -> list[str]:
    """The test files that hold GPU-marked tests: only these are collected, so that a peer missing on the GPU
    image (datasets, trl, ...) cannot break collection of the others."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").rglob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text(encoding="utf-8"))


def pytest_command(junit: Path) -> list[str]:
    """The GPU-marked tests (skipped, with the reason, where no CUDA device is visible)."""
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs",
            "--continue-on-collection-errors", f"--junitxml={junit}", *gpu_test_files()]


def junit_records(junit: Path) -> list[dict[str, Any]]:
    """One record per test case of a junit XML file: test, outcome, time_s, message (first line)."""
    records = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else ""
                break
        records.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                        "time_s": case.get("time"), "message": message})
    return records


def run_gpu_tests(out: Path, timeout_s: float) -> tuple[str, str]:
    from tellneo.io import atomic_write_csv

    junit = out / "gpu_tests.xml"
    try:
        proc = _run(pytest_command(junit), timeout_s)
    except subprocess.TimeoutExpired:
        partial = f"; partial junit in {junit.name}" if junit.exists() else ""
        return "partial", f"pytest ran over the {timeout_s:.0f} s it had left{partial}"
    if not junit.exists():
        raise RuntimeError(f"pytest wrote no junit XML (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    records = junit_records(junit)
    atomic_write_csv(out / "gpu_tests.csv", records, first_columns=["test", "outcome", "time_s", "message"])
    counts: dict[str, int] = {}
    for r in records:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no tests collected"
    bad = counts.get("failed", 0) + counts.get("error", 0)
    if proc.returncode not in (0, 1, 5):
        raise RuntimeError(f"pytest exited {proc.returncode} ({summary}):\n{proc.stdout[-3000:]}")
    return ("partial" if bad else "ok"), f"pytest -m gpu: {summary}"
