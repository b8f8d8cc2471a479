"""``tellneo`` console entry point: one subcommand per module in :mod:`tellneo.commands`.

User errors (missing or corrupt files, bad flags, unwritable output) print one line and exit with status 2;
Ctrl-C exits with 130 after the running command has saved what it can.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from tellneo.commands._common import HelpFormatter, UserError

__all__ = ["COMMANDS", "HelpFormatter", "Parser", "UserError", "build_parser", "main"]

COMMANDS = ("info", "mix", "distill", "tell", "bench")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (unknown flag, ``--seq-len 1e9`` for an int) are one line, exit status 2,
    like every other user error: ``tellneo distill: error: argument --seq-len: invalid int value: '1e9'``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _user_error_types() -> tuple[type[BaseException], ...]:
    from tellneo._backend import BackendError
    from tellneo._ext import NativeExtensionError
    from tellneo.data.chat import DataFileError
    from tellneo.io import RunDirLockedError
    from tellneo.models import ModelNotFoundError

    return (UserError, DataFileError, ModelNotFoundError, NativeExtensionError, BackendError, PermissionError,
            FileExistsError, RunDirLockedError)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tellneo",
        description="Token-efficient fine-tuning (TELL) and LoRA distillation (LLM-NEO) of causal LMs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tellneo.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"tellneo.commands.{name}":
                continue  # command not shipped in this version
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        if getattr(args, "config", None) is not None:  # --config MANIFEST: its settings become the defaults
            args = args.reparse_with_config(parser, argv, args)
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"\ntellneo {args.command}: interrupted", file=sys.stderr)
        return 130
    except _user_error_types() as exc:
        print(f"tellneo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        from tellneo.io import release_run_dirs

        release_run_dirs()  # the kernel would at exit; main() may be called again in this process (tests)


if __name__ == "__main__":
    sys.exit(main())
