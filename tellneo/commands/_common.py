"""Pieces every ``tellneo`` subcommand shares with the entry point :mod:`tellneo.cli`.

Import direction is one way: :mod:`tellneo.cli` and the modules of :mod:`tellneo.commands` import this module,
and this module imports only the standard library, so a command module imports without :mod:`tellneo.cli`
(``tellneo.cli`` re-exports these names for code written against it).
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help already states its default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""
