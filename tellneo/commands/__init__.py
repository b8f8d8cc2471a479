"""Subcommands of the ``tellneo`` CLI; each public module has ``add_parser(subparsers)`` and sets ``run`` on its
parser. Underscored modules are helpers the commands share (``_common``: the pieces :mod:`tellneo.cli` shares
with them, imported one way)."""
