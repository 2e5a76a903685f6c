"""Small click helpers shared by commands: option types and callbacks (no heavy imports)."""

from __future__ import annotations

from typing import Any

import click


class MethodName(click.ParamType):
    """A bound method name from the method registry (loaded only when needed), resolved at once:
    an unknown name, or an optional method whose package is missing, fails here in one line."""

    name = "method"

    @staticmethod
    def _names() -> list[str]:
        from certify.bounds import list_methods

        return list_methods()

    def get_metavar(self, *args: Any, **kwargs: Any) -> str:
        return "[" + "|".join(self._names()) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from certify.bounds import get_method
        from certify.errors import unknown_name

        names = self._names()
        if value not in names:
            self.fail(str(unknown_name("method", str(value), names)), param, ctx)
        get_method(str(value))  # an optional method's package missing: one line, exit 1
        return str(value)


def parse_indices(text: str) -> tuple[int, ...]:
    """Sample positions ``0,5,10`` and ranges ``100:200`` (end excluded), mixed: ``0:10,50``.

    Raises:
        ValueError: a part that is neither a position nor a range.
    """
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if ":" in part:
            a, b = part.split(":")
            out.extend(range(int(a), int(b)))
        elif part:
            out.append(int(part))
    return tuple(out)


def indices_callback(ctx: click.Context, param: click.Parameter, value: str | None
                     ) -> tuple[int, ...] | None:
    """The click callback of ``--indices`` (:func:`parse_indices`; a bad value is exit code 2)."""
    if value is None:
        return None
    try:
        return parse_indices(value)
    except ValueError:
        raise click.BadParameter(f"expected positions like 0,5,10 or 0:100, got {value!r}",
                                 ctx=ctx, param=param) from None
