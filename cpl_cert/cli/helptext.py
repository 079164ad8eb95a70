"""Help pages that read the same under every Typer the project allows.

Recent Typer versions write required arguments as ``{model_path}``, give flags a ``<bool>`` value
placeholder and keep the line breaks of wrapped docstrings. These command classes write arguments
as their metavar (``MODEL``), flags without a placeholder, and each docstring paragraph as one
paragraph that the terminal wraps.
"""

from __future__ import annotations

import inspect
from typing import Any

from typer.core import TyperCommand, TyperGroup


def reflow(text: str | None) -> str | None:
    """``text`` with the line breaks inside each paragraph removed (paragraphs are separated by a blank line)."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _no_placeholder(*args: Any, **kwargs: Any) -> None:
    return None


def _clean_params(params: list[Any]) -> list[Any]:
    """Flags take no value: hide the type placeholder some Typer versions show for them; and no ``[default: None]``."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.display_type_rich = _no_placeholder
        if getattr(param, "default", 0) is None:
            param.show_default = False
    return params


def _usage_piece(param: Any) -> str:
    name = param.metavar or (param.name or "").upper()
    name += "..." if param.nargs != 1 else ""
    return name if param.required else f"[{name}]"


class Command(TyperCommand):
    """A command whose usage line names arguments by metavar and whose help has clean flags and paragraphs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = reflow(self.help)

    def get_params(self, ctx: Any) -> list[Any]:
        return _clean_params(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [_usage_piece(p) for p in self.get_params(ctx) if p.param_type_name == "argument"]


class Group(TyperGroup):
    """The root command, with the same clean flags."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _clean_params(super().get_params(ctx))
