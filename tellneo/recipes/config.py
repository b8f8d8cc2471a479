"""What the recipe configs share: the former flat keyword names (``lora_r=...``) accepted with a warning."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["accepts_flat_names"]

T = TypeVar("T", bound=type)


def accepts_flat_names(names: Sequence[str], build: Callable[[dict[str, Any], dict[str, Any]], None]
                       ) -> Callable[[T], T]:
    """Class decorator for a dataclass config whose settings were once flat fields: its ``__init__`` also accepts
    ``names``, warns (DeprecationWarning) and hands them to ``build(flat, kwargs)``, which turns them into the
    composed fields in ``kwargs`` before the dataclass ``__init__`` runs."""
    def wrap(cls: T) -> T:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            flat = {name: kwargs.pop(name) for name in names if name in kwargs}
            if flat:
                warnings.warn(f"{cls.__name__}({', '.join(flat)}=...): these keywords are deprecated; the settings "
                              "live in the config's lora / kd / train fields", DeprecationWarning, stacklevel=2)
                build(flat, kwargs)
            init(self, *args, **kwargs)

        cls.__init__ = __init__  # type: ignore[misc]
        return cls

    return wrap
