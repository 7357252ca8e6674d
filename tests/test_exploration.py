"""History-driven exploration: the gradient proposer's trajectory grows after runs of
non-significant steps and resets after a significant one, without recompiling."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ev3core
from ev3core.errors import ConfigurationError


def _problem():
    # One example repeated: every sampled batch is the same, so a trajectory is
    # deterministic and a run of L steps can be compared across proposers.
    x = jnp.tile(jnp.array([[0.5, -1.0]]), (16, 1))
    y = jnp.ones((16,), jnp.int32)
    model = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    return (x, y), params, static


def _outcome(significant, params):
    return ev3core.Outcome(
        accepted_index=jnp.int32(-1),
        accepted=jnp.bool_(False),
        significant=jnp.bool_(significant),
        params=params,
    )


def _proposer(**kw):
    return ev3core.GradientProposer([ev3core.CrossEntropy()], [optax.sgd(0.1)], batch_size=4, **kw)


def test_length_grows_after_patience_and_resets_after_a_significant_step():
    _, params, static = _problem()
    prop = _proposer(steps=2, max_steps=10, growth_factor=2.0, patience=2)
    state = prop.init(params, static, jax.random.key(0))
    lengths = []
    for significant in [False, False, False, False, False, False, False, False, True, False]:
        state = prop.adapt(state, _outcome(significant, params))
        lengths.append(int(state.length))
    assert lengths == [2, 4, 4, 8, 8, 10, 10, 10, 2, 2]


def test_masked_steps_equal_a_shorter_trajectory_and_never_recompile():
    data, params, static = _problem()
    grow = _proposer(steps=3, max_steps=8)
    propose = eqx.filter_jit(eqx.debug.assert_max_traces(grow.propose, max_traces=1))
    state = grow.init(params, static, jax.random.key(0))
    for length in (3, 5, 8):
        st = eqx.tree_at(lambda s: s.length, state, jnp.int32(length))
        cands, new_state = propose(params, static, st, data, jax.random.key(1))
        plain = _proposer(steps=length)
        ref, _ = plain.propose(
            params, static, plain.init(params, static, jax.random.key(0)), data, jax.random.key(1)
        )
        for a, b in zip(jax.tree.leaves(cands), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert int(new_state.length) == length


def test_no_growth_keeps_the_state_as_it_was():
    _, params, static = _problem()
    prop = _proposer(steps=3)
    assert not prop.grows
    state = prop.init(params, static, jax.random.key(0))
    assert state.length is None and state.streak is None
    out = prop.adapt(state, _outcome(False, params))
    assert jax.tree.structure(out) == jax.tree.structure(state)
    with pytest.raises(ConfigurationError, match="max_steps"):
        _proposer(steps=5, max_steps=3)
    with pytest.raises(ConfigurationError, match="growth_factor"):
        _proposer(steps=5, max_steps=10, growth_factor=0.5)


def test_growth_runs_in_the_engine(builtin_plugins):

    data, _ = ev3core.toy_problem(jax.random.key(0), n=4096)
    prop = ev3core.GradientProposer(
        [ev3core.CrossEntropy()], [optax.sgd(0.01)], steps=2, batch_size=8, max_steps=16, patience=1
    )
    p = builtin_plugins
    engine = ev3core.Pipeline(
        [prop],
        ["accuracy"],
        ev3core.EV3Scheduler(decide_alpha=4.0),
        assess_size=64,
        decide_size=512,
        plugins=p,
    ).build()
    state = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    state, infos = ev3core.run(engine, state, data, 5, plugins=p, chunk=5)
    # every non-significant step doubles the length (patience 1), a significant one resets it
    length = 2
    for sig in infos.significant:
        length = 2 if sig else min(2 * length, 16)
    assert int(state.proposer_states[0].length) == length
