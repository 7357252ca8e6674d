"""Host-side values kept beside one engine and dropped with it.

An engine is an immutable `eqx.Module`: a value computed from it (its static/array split, the
data signatures `check_data` has already evaluated) can be kept for its lifetime, but not on
it (an attribute would change its tree structure), and not in a process-wide table that
outlives it (a script that rebuilds its pipeline per trial would keep every engine it ever
built, with its optimizers and its model's structure).
"""

from __future__ import annotations

import weakref
from typing import Any

#: id(engine) -> (weak reference to it, its memo); an entry is removed when its engine dies.
_MEMOS: dict[int, tuple[weakref.ref[Any], dict[str, Any]]] = {}


def memo(engine: Any) -> dict[str, Any]:
    """The memo dict of `engine`: empty on first use, the same dict while `engine` lives,
    released (with everything in it) when `engine` is garbage collected."""
    key = id(engine)
    entry = _MEMOS.get(key)
    if entry is not None and entry[0]() is engine:
        return entry[1]
    values: dict[str, Any] = {}
    try:
        ref = weakref.ref(engine)
    except TypeError:  # not weakly referenceable: nothing is kept
        return values
    _MEMOS[key] = (ref, values)
    weakref.finalize(engine, _drop, key, values)
    return values


def _drop(key: int, values: dict[str, Any]) -> None:
    # Only this engine's entry: the id may already name a newer object's memo.
    entry = _MEMOS.get(key)
    if entry is not None and entry[1] is values:
        del _MEMOS[key]
