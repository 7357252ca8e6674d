"""Rebuilt engines are released: nothing in ev3core keeps an engine, its optimizers or its
model's structure alive once the caller drops it and `jax.clear_caches()` has run (a script
that rebuilds its pipeline per trial must not grow), while equal engines still share their
compiled programs."""

from __future__ import annotations

import gc
import weakref

import jax
import optax

import ev3core
from ev3core._engine import memo


def _engine(optimizers) -> ev3core.Engine:
    proposer = ev3core.GradientProposer(
        [ev3core.CrossEntropy(1.0)], optimizers, steps=2, batch_size=8
    )
    return ev3core.Engine(
        [proposer], [ev3core.Accuracy()], ev3core.EV3Scheduler(0.5, 4.0),
        assess_size=16, decide_size=32,
    )  # fmt: skip


def _build_run_drop(data, model, chunk: int) -> list[weakref.ref]:
    sgd, momentum = optax.sgd(0.1), optax.sgd(0.01, momentum=0.9)  # new closures
    engine = _engine([sgd, momentum])
    refs = [weakref.ref(engine), weakref.ref(sgd.update), weakref.ref(momentum.init)]
    state = engine.init(model, jax.random.key(2))
    ev3core.run(engine, state, data, 2, plugins=ev3core.load_plugins(autoload=False), chunk=chunk)
    state, _ = engine.step(state, data)
    jax.block_until_ready(state)
    return refs


def test_a_dropped_engine_and_its_optimizers_are_collected(tiny_problem):
    data, model = tiny_problem
    refs = [r for chunk in (1, 2) for r in _build_run_drop(data, model, chunk)]
    jax.clear_caches()
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"still referenced after the engine was dropped: {alive}"
    assert not any(entry[0]() is None for entry in memo._MEMOS.values())


def test_the_memo_dies_with_its_engine():
    engine = _engine([optax.sgd(0.1)])
    values = memo.memo(engine)
    assert memo.memo(engine) is values
    values["x"] = 1
    key = id(engine)
    del engine
    gc.collect()
    assert key not in memo._MEMOS


def test_equal_rebuilt_engines_share_the_compiled_init_step_and_scan(tiny_problem):
    from ev3core._engine.engine import _jit_init, _jit_scan, _jit_step

    data, model = tiny_problem

    def build() -> ev3core.Engine:
        return _engine([ev3core.Optimizer(optax.sgd, learning_rate=0.1)])

    first = build()
    state = first.init(model, jax.random.key(2))
    first.step(state, data)
    first.scan(state, data, 2)
    sizes = [f._cache_size() for f in (_jit_init, _jit_step, _jit_scan)]
    del first
    gc.collect()
    again = build()
    state = again.init(model, jax.random.key(3))
    again.step(state, data)
    again.scan(state, data, 2)
    assert [f._cache_size() for f in (_jit_init, _jit_step, _jit_scan)] == sizes
