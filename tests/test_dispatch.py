"""`Engine.step` as one plain `jax.jit` dispatch: the caller's state is never donated or
changed, the engine's structure is untouched by the cached split, and `step_donated` reuses
the buffers of the state it is given only."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ev3core


def _host(tree):
    def one(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x)

    return jax.tree.map(one, tree)


def _same(a, b) -> bool:
    la, lb = jax.tree.leaves(_host(a)), jax.tree.leaves(_host(b))
    return len(la) == len(lb) and all(np.array_equal(x, y, equal_nan=True) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def engine():
    proposer = ev3core.GradientProposer(
        [ev3core.CrossEntropy(1.0)], [optax.sgd(0.1), optax.sgd(0.01, momentum=0.9)],
        steps=2, batch_size=8,
    )  # fmt: skip
    return ev3core.Engine(
        [proposer], [ev3core.Accuracy()], ev3core.EV3Scheduler(0.5, 4.0),
        assess_size=16, decide_size=32,
    )  # fmt: skip


def test_step_keeps_the_callers_state(engine, tiny_problem):
    data, model = tiny_problem
    old = engine.init(model, jax.random.key(0))
    before = _host(old)
    new, _ = engine.step(old, data)
    newer, _ = engine.step(new, data)
    jax.block_until_ready(newer)
    # Nothing the caller holds was donated: the old states are alive and unchanged.
    assert not any(x.is_deleted() for x in jax.tree.leaves((old, new)))
    assert _same(old, before)
    assert not _same(new, before)  # the step did move the state


def test_donated_buffers_never_alias_a_state_the_caller_holds(engine, tiny_problem):
    data, model = tiny_problem
    kept = engine.init(model, jax.random.key(1))
    before = _host(kept)
    # run() starts from the caller's state; its own intermediate states are its business.
    final, _ = ev3core.run(engine, kept, data, 3, observers=[])
    assert not any(x.is_deleted() for x in jax.tree.leaves(kept))
    assert _same(kept, before)
    # step_donated consumes the state it is given, and only that one, with the same result.
    step1, _ = engine.step(kept, data)
    copy = _restore(_host(step1), step1)
    step2, _ = engine.step_donated(step1, data)
    jax.block_until_ready(step2)
    assert _same(kept, before)
    assert any(x.is_deleted() for x in jax.tree.leaves(step1))
    assert not any(x.is_deleted() for x in jax.tree.leaves((step2, copy)))
    assert _same(step2, engine.step(copy, data)[0])


def _restore(host_tree, like):
    return jax.tree.map(
        lambda h, x: (
            jax.random.wrap_key_data(jnp.asarray(h), impl=jax.random.key_impl(x))
            if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
            else jnp.asarray(h)
        ),
        host_tree,
        like,
    )


def test_the_step_does_not_change_the_engines_structure(engine, tiny_problem):
    data, model = tiny_problem
    structure = jax.tree.structure(engine)
    state = engine.init(model, jax.random.key(2))
    engine.step(state, data)
    assert jax.tree.structure(engine) == structure
    # A new hyperparameter value: a new engine, the same compiled step (no re-trace).
    hotter = eqx.tree_at(
        lambda e: e.proposers[0].losses[0].temperature, engine, jnp.asarray(2.0, jnp.float32)
    )
    from ev3core._engine.engine import _jit_step

    size = _jit_step._cache_size()
    hotter.step(state, data)
    assert _jit_step._cache_size() == size
