"""``tellneo bench``: run the benchmark suites of a tellneo checkout and regenerate their CSV + PNG files.

The suites (``benchmarks/``) are not installed with the package, only their harness :mod:`tellneo.bench` is, so
this command needs a source checkout: the current directory or one above it, or the checkout an editable install
points into; without one it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path


def _checkout_root(start: Path) -> Path | None:
    """The tellneo checkout holding ``start`` (or the editable install's), identified by ``benchmarks/__init__.py``
    beside ``tellneo/``; None when there is none."""
    for d in (start, *start.parents):
        if (d / "benchmarks" / "__init__.py").is_file() and (d / "tellneo").is_dir():
            return d
    here = Path(__file__).resolve().parents[2]  # editable install: the package lives in the checkout
    return here if (here / "benchmarks" / "__init__.py").is_file() else None


def available_suites(root: Path) -> list[str]:
    """Names of the suites ``benchmarks/bench_<name>.py`` in the checkout ``root``, sorted."""
    return sorted(p.stem.removeprefix("bench_") for p in (root / "benchmarks").glob("bench_*.py"))


def _make_importable(root: Path) -> None:
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def default_suites(root: Path) -> list[str]:
    """The suites ``tellneo bench`` runs when none is named: all but those whose module sets ``SLOW = True``."""
    _make_importable(root)
    return [s for s in available_suites(root)
            if not getattr(importlib.import_module(f"benchmarks.bench_{s}"), "SLOW", False)]


def add_parser(sub: argparse._SubParsersAction) -> None:
    from tellneo.commands._common import HelpFormatter

    p = sub.add_parser(
        "bench",
        help="run benchmark suites (tellneo vs its peers) and write CSV + PNG",
        description="Run the benchmark scripts benchmarks/bench_<name>.py of a tellneo source checkout (found "
                    "from the current directory or the editable install; the suites are not installed with the "
                    "package, so an installed tellneo alone cannot run them). Each writes CSV + PNG under the "
                    "checkout's benchmarks/results/ (benchmarks/results/gpu/ for CUDA runs). Extra arguments "
                    "after '--' are passed to every suite (e.g. -- --quick).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("suites", nargs="*", help="suite names (e.g. mixer); default: all suites found except the slow "
                   "ones (methods: the NEO/TELL experiments, about two hours on CPU), which run only when named")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    p.add_argument("suite_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tellneo.commands._common import UserError

    root = _checkout_root(Path.cwd())
    if root is None:
        raise UserError("no tellneo checkout found: `tellneo bench` needs a source checkout (benchmarks/ is not "
                        "installed with the package); run it inside the repository")
    suites = available_suites(root)
    if args.list:
        print("\n".join(suites))
        return 0
    extra = [a for a in args.suite_args if a != "--"]
    chosen = [s for s in args.suites if s != "--"]
    unknown = sorted(set(chosen) - set(suites))
    if unknown:
        raise UserError(f"unknown suite(s) {unknown}; available: {suites}")
    _make_importable(root)
    if not chosen:
        chosen = default_suites(root)
        print(f"running {chosen} (slow suites run only when named: "
              f"{sorted(set(suites) - set(chosen))})", flush=True)
    status = 0
    for name in chosen:
        print(f"== tellneo bench {name} ==", flush=True)
        module = importlib.import_module(f"benchmarks.bench_{name}")
        status |= int(module.main(extra) or 0)
    return status
