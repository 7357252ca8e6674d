"""The plugin module named by the `ev3` entry point: hook implementations only."""

from __future__ import annotations

from typing import Any

import ev3core

from ._components import MarginScheduler, Signum, TopKAccuracy


@ev3core.hookimpl
def ev3_register_proposers() -> dict[str, type]:
    return {"signum": Signum}


@ev3core.hookimpl
def ev3_register_assessors() -> dict[str, type]:
    return {"top_k": TopKAccuracy}


@ev3core.hookimpl
def ev3_register_schedulers() -> dict[str, type]:
    return {"margin": MarginScheduler}


@ev3core.hookimpl
def ev3_conformance_examples(kind: str, name: str, cls: type) -> list[Any] | None:
    """Instances for `ev3core.testing` (every component here also builds with no arguments;
    these pick small, quick settings and a top-k that the kit's 4-class problem can fail)."""
    if cls is Signum:
        return [Signum(learning_rates=(0.1, 0.01), batch_size=16)]
    if cls is TopKAccuracy:
        return [TopKAccuracy(k=2)]
    if cls is MarginScheduler:
        return [MarginScheduler(margin=0.01)]
    return None
