"""Subcommands of the ``tellneo`` CLI; each module has ``add_parser(subparsers)`` and sets ``run`` on its parser."""
