"""``--config OUTPUT_DIR/manifest.json``: start a run from the manifest an earlier run wrote, to repeat it.

The manifest's settings become the command's defaults and the command line is parsed again, so
``tellneo distill --config old/manifest.json --output-dir new`` repeats the old run exactly (same manifest, same
config hash), and any flag given as well overrides the manifest (``--config old/manifest.json --seed 1``).
Run-control flags (``--output-dir``, ``--resume``, ``--overwrite``, ``--quiet``, ``--threads``, ``--report-to``) are
not part of a manifest. A manifest of another command, or one with settings this version does not know, is refused
with one line naming them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: manifest entries derived from the others or from the data files (recomputed by the run, never flags)
_DERIVED = {"resolved_lora", "resolved_kd", "anchored", "data_sha256"}


#: flags of the ``lora`` block of a manifest (LoraSettings field -> flag dest); ``patch`` is ``--no-fused-lora``
_LORA_FLAGS = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout", "variant": "lora_variant"}
#: flags of the ``kd`` block of a manifest (KDSettings field -> flag dest)
_KD_FLAGS = {"alpha": "alpha", "temperature": "temperature", "divergence": "divergence", "beta": "beta"}


def _block_flags(config: dict[str, Any], block: str, names: dict[str, str], defaults: dict[str, Any]
                 ) -> dict[str, Any]:
    """``{dest: value}`` for the fields of ``config[block]`` that have flags; the others must hold their defaults
    (no flag could repeat them) and are otherwise put back as ``block.field`` for the caller to refuse."""
    values = config.pop(block, None)
    if not isinstance(values, dict):
        return {}
    flags = {}
    for key, value in values.items():
        if key in names:
            flags[names[key]] = value
        elif key not in defaults or value != defaults[key]:
            config[f"{block}.{key}"] = value
    return flags


def lora_flags(config: dict[str, Any]) -> dict[str, Any]:
    """The flags of a manifest's ``lora`` block (removed from ``config``; see :func:`_block_flags`)."""
    from tellneo.recipes.lora import LoraSettings

    lora = config.get("lora")
    if not isinstance(lora, dict):
        config.pop("lora", None)
        return {}
    lora = dict(lora)
    patch = lora.pop("patch", True)
    config["lora"] = lora
    return {**_block_flags(config, "lora", _LORA_FLAGS, LoraSettings().to_dict()), "no_fused_lora": not patch}


def kd_flags(config: dict[str, Any]) -> dict[str, Any]:
    """The flags of a manifest's ``kd`` block (removed from ``config``; see :func:`_block_flags`)."""
    from dataclasses import asdict

    from tellneo.recipes.settings import KDSettings

    return _block_flags(config, "kd", _KD_FLAGS, asdict(KDSettings()))


def add_config_flag(p: argparse.ArgumentParser, command: str,
                    translate: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """Add ``--config`` to ``p`` (the ``tellneo COMMAND`` subparser). ``translate`` maps manifest entries whose
    flag differs in name or meaning to ``{dest: value}`` and removes them from the dict it is given."""
    p.add_argument("--config", type=Path, metavar="MANIFEST",
                   help=f"repeat a run: take every setting from the manifest.json an earlier `tellneo {command}` "
                        "wrote into its output directory; flags given as well override it (--output-dir, "
                        "--resume, --overwrite, --quiet, --threads and --report-to are not part of a manifest)")
    p.set_defaults(reparse_with_config=lambda parser, argv, args: _reparse(p, command, translate, parser, argv,
                                                                          args))


def read_config_file(path: Path) -> dict[str, Any]:
    """The ``config`` of a run manifest (or a plain JSON object of settings); UserError naming the problem."""
    from tellneo.commands._common import UserError

    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--config {path}: not a readable JSON manifest ({exc})") from None
    config = data.get("config", data) if isinstance(data, dict) else None
    if not isinstance(config, dict):
        raise UserError(f"--config {path}: expected a JSON object (a run's manifest.json)")
    return dict(config)


def config_defaults(config: dict[str, Any], p: argparse.ArgumentParser, command: str, path: Path,
                    translate: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """``{dest: value}`` defaults for the subparser ``p`` from a manifest config (its ``train`` block flattened:
    its fields are flags of the same names). Unknown entries raise UserError."""
    from tellneo.commands._common import UserError

    config = {k: v for k, v in config.items() if k not in _DERIVED}
    train = config.pop("train", None) or {}
    if not isinstance(train, dict):
        raise UserError(f"--config {path}: 'train' must be an object")
    defaults = translate(config) if translate is not None else {}
    dests = {a.dest for a in p._actions}
    for key, value in {**config, **train}.items():
        if key not in dests:
            unknown = sorted(k for k in {**config, **train} if k not in dests)
            raise UserError(f"--config {path}: not a manifest of `tellneo {command}` (unknown settings: "
                            f"{', '.join(unknown)})")
        defaults[key] = value
    return defaults


def _reparse(p: argparse.ArgumentParser, command: str, translate: Any, parser: argparse.ArgumentParser,
             argv: Sequence[str] | None, args: argparse.Namespace) -> argparse.Namespace:
    defaults = config_defaults(read_config_file(args.config), p, command, args.config, translate)
    p.set_defaults(**defaults)
    return parser.parse_args(argv)
