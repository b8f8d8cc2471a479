"""The recipes' error type (the CLI prints it as one line, exit status 2)."""

from __future__ import annotations

__all__ = ["RecipeError"]


class RecipeError(ValueError):
    """A recipe cannot run with the given configuration or data (the CLI prints it as one line, exit status 2)."""
