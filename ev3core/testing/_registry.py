"""Dispatch by kind and the registry: `check`, `Example`, the examples plugins give through
`ev3_conformance_examples`, and checking every registered component."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from .._plugins.manager import plugin_manager
from ._assessors import check_assessor
from ._bounds import check_bound
from ._checker import (
    CHECKS,
    KINDS,
    ConformanceError,
    Report,
)
from ._example import Example
from ._examples import ev3_conformance_examples as _builtin_examples
from ._losses import check_loss
from ._priorities import check_priority
from ._proposers import check_proposer
from ._schedulers import check_scheduler


def check(component: Any, **options: Any) -> Report:
    """Run the checks for `component`'s kind (`check_proposer`, `check_assessor`, ...)."""
    for kind, fn in _CHECKERS.items():
        if isinstance(component, KINDS[kind]):
            return fn(component, **options)
    raise TypeError(
        f"{type(component).__qualname__} is not a component the conformance kit checks "
        f"({', '.join(b.__name__ for b in KINDS.values())})."
    )


_CHECKERS: dict[str, Callable[..., Report]] = {
    "proposer": check_proposer,
    "assessor": check_assessor,
    "scheduler": check_scheduler,
    "loss": check_loss,
    "bound": check_bound,
    "priority": check_priority,
}


def _as_example(item: Any) -> Example:
    return item if isinstance(item, Example) else Example(item)


def examples(kind: str, name: str, plugins: Any = None) -> list[Example]:
    """The examples of the component registered as `name`: those the plugins give through
    `ev3_conformance_examples`, else `cls()`. A component that cannot be built gives one
    `Example` whose `error` says how to fix it (checking it raises `ConformanceError`).
    Each example's `rebuild` builds it again the same way (for the `"no_recompile"` check)."""
    plugins = _plugins(plugins)
    out = _build(kind, name, plugins)
    cls = plugins.components(kind)[name].cls
    for i, ex in enumerate(out):
        ex.label = f"{kind}:{name}[{i}]"
        if ex.error is None and not isinstance(ex.component, cls):
            ex.error = (
                f"an ev3_conformance_examples example for {kind} {name!r} is "
                f"{ex.component!r}, not an instance of {cls.__qualname__}. Fix: return "
                "instances of the registered class"
            )
        if ex.error is None:
            ex.rebuild = functools.partial(_rebuild, kind, name, plugins, i)
    return out


def _plugins(plugins: Any) -> Any:
    return plugin_manager() if plugins is None else plugins


def _build(kind: str, name: str, plugins: Any) -> list[Example]:
    info = plugins.components(kind)[name]
    cls = info.cls
    found: list[Any] = []
    # ev3core's own examples join the plugins' answers (the core never imports the kit)
    for result in plugins.pm.hook.ev3_conformance_examples.call_extra(
        [_builtin_examples], {"kind": kind, "name": name, "cls": cls}
    ):
        found.extend(result or [])
    if found:
        return [_as_example(x) for x in found]
    ex = Example(None)
    try:
        ex.component = cls()
    except Exception as exc:  # noqa: BLE001 - reported when checked
        ex.error = (
            f"{kind} {name!r} ({cls.__module__}.{cls.__qualname__}, plugin "
            f"{info.plugin!r}) has no conformance example and cls() raised "
            f"{type(exc).__name__}: {exc}. Fix: implement the `ev3_conformance_examples` "
            "hook in the plugin and return example instances of it"
        )
    return [ex]


def _rebuild(kind: str, name: str, plugins: Any, index: int) -> Any:
    return _build(kind, name, plugins)[index].component


def registered_examples(
    plugins: Any = None, kinds: Sequence[str] = tuple(KINDS)
) -> list[tuple[str, str, Example]]:
    """`(kind, name, example)` for every registered component of `kinds` and each of its
    examples: parametrise a test over it so that every newly registered component is
    checked."""
    plugins = _plugins(plugins)
    return [
        (kind, name, ex)
        for kind in kinds
        for name in sorted(plugins.components(kind))
        for ex in examples(kind, name, plugins)
    ]


def check_example(kind: str, example: Example) -> Report:
    """Check one `Example` as a component of `kind`."""
    if example.error is not None:
        raise ConformanceError(example.error)
    options = dict(example.options)
    if example.rebuild is not None:
        options.setdefault("rebuild", example.rebuild)
    return _CHECKERS[kind](example.component, **options)


def check_registered(kind: str, name: str, plugins: Any = None) -> Report:
    """Check every example of the component registered as `name` (see `examples`); the
    report lists a check as not applicable only if it applies to none of them."""
    ran: list[str] = []
    skipped: dict[str, str] = {}
    for ex in examples(kind, name, plugins):
        report = check_example(kind, ex)
        ran.extend(c for c in report if c not in ran)
        skipped.update(report.not_applicable)
    missing = {c: w for c, w in skipped.items() if c not in ran}
    return Report([c for c in CHECKS if c in ran], missing)
