"""The CIFAR-style ResNet student of ev3-distill and its function-preserving growth."""

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ev3_distill import (
    GrowthPolicy,
    ResNet,
    deepen_resnet,
    grow_resnet,
    grow_state,
    make_resnet,
    widen_resnet,
)

import ev3core as ev3
from ev3core.errors import ConfigurationError

# `make test` runs `pytest -n 2 --dist loadgroup`: this module's tests run
# in one worker, which builds the `trained` ResNet (and compiles its programs) once for all of them.
pytestmark = pytest.mark.xdist_group("resnet")


SHAPE = (8, 8, 3)


# The forward passes are compiled (once per architecture): run op by op, every layer shape
# compiles programs of its own.
@eqx.filter_jit
def _train_pass(model, state, x):
    m = eqx.nn.inference_mode(model, False)
    return jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)


@eqx.filter_jit
def _infer(model, state, x):
    m = eqx.nn.inference_mode(model, True)
    return jax.vmap(lambda xi: m(xi, state)[0])(x)


@eqx.filter_jit
def _apply(model, x):
    return jax.vmap(model)(x)


@pytest.fixture(scope="module")
def trained():
    """A ResNet-8 whose BatchNorm scales, shifts and running statistics are not at their
    initial values (so that preserving outputs is not trivially true)."""
    model, state = make_resnet(SHAPE, 5, depth=8, widths=(4, 6, 8), key=jax.random.key(0))
    k1, k2 = jax.random.split(jax.random.key(1))
    # every weight moved by 0.3 N(0, 1), from one draw (a draw per weight shape would compile
    # a random program per shape)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    noise = np.asarray(jax.random.normal(k1, (sum(a.size for a in leaves),)))
    ends = np.cumsum([a.size for a in leaves])
    leaves = [
        jnp.asarray(np.asarray(a) + 0.3 * n.reshape(a.shape))
        for a, n in zip(leaves, np.split(noise, ends[:-1]))
    ]
    model = eqx.combine(jax.tree.unflatten(treedef, leaves), static)
    x = jax.random.normal(k2, (32, *SHAPE))
    for scale in (1.0, 2.0):
        _, state = _train_pass(model, state, x * scale + 0.5)
    return model, state, x


def test_resnet_shapes_and_depth():
    model, state = make_resnet((8, 8, 3), 10, depth=14, key=jax.random.key(0))
    assert model.depth == 14 and model.blocks == (2, 2, 2) and model.widths == (16, 32, 64)
    y = _infer(model, state, jnp.ones((2, 8, 8, 3)))
    assert y.shape == (2, 10)
    with pytest.raises(ConfigurationError, match="6 s \\+ 2"):
        ResNet((32, 32, 3), 10, depth=10, key=jax.random.key(0))


def test_widen_preserves_outputs(trained):
    model, state, x = trained
    grown, gstate = widen_resnet(model, state, 2.0, key=jax.random.key(5))
    assert grown.widths == (8, 12, 16) and grown.depth == model.depth
    before = _infer(model, state, x)
    assert float(jnp.max(jnp.abs(_infer(grown, gstate, x) - before))) < 1e-5
    # the new channels are live parameters (fresh weights), silenced only by zero BN scales
    new_w = grown.stages[0][0].conv1.weight[4:]
    assert float(jnp.max(jnp.abs(new_w))) > 0
    assert float(jnp.max(jnp.abs(grown.stages[0][0].bn2.weight[4:]))) == 0
    # and in training mode the old outputs do not change either (new channels stay zero)
    t0, _ = _train_pass(model, jax.tree.map(jnp.copy, state), x)
    t1, _ = _train_pass(grown, jax.tree.map(jnp.copy, gstate), x)
    assert float(jnp.max(jnp.abs(t0 - t1))) < 1e-5


def test_deepen_preserves_outputs(trained):
    model, state, x = trained
    grown, gstate = deepen_resnet(model, state, key=jax.random.key(6))
    assert grown.depth == model.depth + 6 and grown.blocks == (2, 2, 2)
    before = _infer(model, state, x)
    assert float(jnp.max(jnp.abs(_infer(grown, gstate, x) - before))) < 1e-5
    new = grown.stages[1][1]
    assert float(jnp.max(jnp.abs(new.bn2.weight))) == 0
    assert float(jnp.min(new.bn1.weight)) == 1.0  # the first BN of the new block is live
    # widen after deepen: still the same function
    wide, wstate = widen_resnet(grown, gstate, 1.5, key=jax.random.key(7))
    assert float(jnp.max(jnp.abs(_infer(wide, wstate, x) - before))) < 1e-5


def test_growth_rejects_wrong_inputs(trained):
    model, state, _ = trained
    with pytest.raises(ConfigurationError, match="eqx.nn.State"):
        widen_resnet(model, None, 2.0, key=jax.random.key(0))
    with pytest.raises(ConfigurationError, match="factor"):
        widen_resnet(model, state, 1.0, key=jax.random.key(0))


def test_growth_inside_a_run_grows_optimizer_states_and_lineages(trained, caplog):
    """A stateful ResNet through Engine.step; growing it carries the momentum traces and each
    lineage (outputs preserved per lineage) and the next step re-traces once."""
    model, state, _ = trained
    x = jax.random.normal(jax.random.key(3), (64, *SHAPE))
    y = jax.random.randint(jax.random.key(4), (64,), 0, 5)
    data = ev3.Data(propose=(x, y), assess=(x, y), decide=(x, y))
    proposer = ev3.GradientProposer(
        losses=[ev3.CrossEntropy(1.0), ev3.CrossEntropy(0.5)],
        optimizers=[optax.sgd(0.05, momentum=0.9)],
        steps=2,
        batch_size=8,
        on_reject="continue",
    )
    engine = ev3.Pipeline(
        proposers=[proposer], assessors=["accuracy"], assess_size=16, decide_size=32
    ).build()
    s = engine.init(ev3.Stateful(model, state), jax.random.key(2))
    s, _ = engine.step(s, data)
    old_ps = s.proposer_states[0]
    grown_model = grow_resnet(s.model, "widen", factor=2.0, key=jax.random.key(9))
    grown_stable = grow_resnet(s.stable_model, "widen", factor=2.0, key=jax.random.key(9))
    g = grow_state(engine, s, grown_model, grown_stable, carry=True)
    new_ps = g.proposer_states[0]

    # momentum traces: old values in the old corner, zeros on the new units
    t_old = old_ps.opt_states[0][0][0].trace.stages[0][0].conv1.weight  # [cand, out, in, ..]
    t_new = new_ps.opt_states[0][0][0].trace.stages[0][0].conv1.weight
    assert t_new.shape[:3] == (2, 8, 8)
    assert bool(jnp.all(t_new[:, :4, :4] == t_old)) and float(jnp.max(jnp.abs(t_old))) > 0
    assert float(jnp.max(jnp.abs(t_new[:, 4:]))) == 0

    # every lineage computes what it computed before growth (inference mode)
    static = eqx.filter(s.model, eqx.is_array, inverse=True)
    gstatic = eqx.filter(g.model, eqx.is_array, inverse=True)
    for c in range(2):
        old = eqx.combine(jax.tree.map(lambda a, c=c: a[c], old_ps.lineages[0][0]), static)
        new = eqx.combine(jax.tree.map(lambda a, c=c: a[c], new_ps.lineages[0][0]), gstatic)
        assert float(jnp.max(jnp.abs(_apply(old, x) - _apply(new, x)))) < 1e-5
    assert float(jnp.max(jnp.abs(_apply(s.model, x) - _apply(g.model, x)))) < 1e-5

    caplog.set_level(logging.INFO, logger="ev3core")
    g, _ = engine.step(g, data)
    g, _ = engine.step(g, data)
    traces = [r for r in caplog.records if "tracing the EV3 step" in r.getMessage()]
    assert len(traces) == 1
    assert bool(jnp.all(jnp.isfinite(_apply(g.model, x))))


def test_growth_policy_widens_then_deepens_a_resnet(trained):
    model, state, _ = trained
    policy = GrowthPolicy(patience=1, max_width=16, max_depth=14, factor=2.0)
    m = ev3.Stateful(model, state)
    grown, op = policy.next_model(m, jax.random.key(0))
    assert op.startswith("widen") and grown.model.widths == (8, 12, 16)
    grown, op = policy.next_model(grown, jax.random.key(1))
    assert op.startswith("deepen") and grown.model.depth == 14
    assert policy.next_model(grown, jax.random.key(2)) is None
