"""Naming the pipeline component behind an exception (fault isolation, host side)."""

from __future__ import annotations

import traceback
from types import FrameType
from typing import Any

from ._interfaces import AbstractAssessor, AbstractProposer, AbstractScheduler
from .errors import EV3Error


def _components(engine: Any) -> list[tuple[str, int, Any]]:
    return [
        *(("proposer", i, c) for i, c in enumerate(engine.proposers)),
        *(("assessor", i, c) for i, c in enumerate(engine.assessors)),
        ("scheduler", 0, engine.scheduler),
    ]


def _own_classes(comp: Any) -> list[type]:
    skip = {AbstractAssessor, AbstractProposer, AbstractScheduler, object}
    return [
        cls
        for cls in type(comp).__mro__
        if cls not in skip and not cls.__module__.startswith("equinox")
    ]


def _frame_owner(engine: Any, frame: FrameType) -> tuple[str, int, Any] | None:
    qual = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
    module = frame.f_globals.get("__name__")
    for kind, i, comp in _components(engine):
        for cls in _own_classes(comp):
            if module == cls.__module__ and qual.startswith(cls.__qualname__ + "."):
                return kind, i, comp
    return None


def component_owner(
    engine: Any, exc: BaseException, *, innermost: bool = False
) -> tuple[str, int, Any] | None:
    """The `(kind, index, component)` whose code raised `exc`, or `None`.

    By default the outermost component frame is used (a wrapper is named rather than the
    component it wraps); with `innermost=True` only the frame that raised counts.
    """
    frames = [f for f, _ in traceback.walk_tb(exc.__traceback__)]
    if innermost:
        return _frame_owner(engine, frames[-1]) if frames else None
    for frame in frames:
        owner = _frame_owner(engine, frame)
        if owner is not None:
            return owner
    return None


def describe_component(kind: str, index: int, comp: Any, plugins: Any = None) -> str:
    """`"assessor #1 pkg.Class (registered as 'name' by plugin 'p')"`."""
    cls = type(comp)
    where = "not registered by a plugin: passed as an instance"
    if plugins is not None:
        try:
            for info in plugins.components(kind).values():
                if info.cls is cls:
                    where = f"registered as {info.name!r} by plugin {info.plugin!r}"
                    break
        except EV3Error:
            pass
    return f"{kind} #{index} {cls.__module__}.{cls.__qualname__} ({where})"
