"""``tellneo info``: versions, backends, build flags, GPUs."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print versions, available backends and build flags",
                       description="Print versions, available backends (C++, CUDA, Triton, Triton interpreter, "
                                   "PyTorch) and the build flags of tellneo._C.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.json:
        from tellneo._info import info_dict

        print(json.dumps(info_dict(), indent=2, default=str))
    else:
        import tellneo

        print(tellneo.info())
    return 0
