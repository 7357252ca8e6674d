"""Mixed precision (`ev3core.MixedPrecision`): bfloat16 compute with float32 outputs, float32
or bfloat16 parameters, through training, assessment, checkpoints and an exact resume, with
and without BatchNorm state."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ev3core as ev3
from ev3core._host.checkpoint import state_digest
from ev3core.errors import ConfigurationError


class BNNet(eqx.Module):
    l1: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    l2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(2, 16, key=k1)
        self.bn = eqx.nn.BatchNorm(16, "batch", momentum=0.5, mode="ema")
        self.l2 = eqx.nn.Linear(16, 2, key=k2)

    def __call__(self, x, state, *, key=None):
        h, state = self.bn(self.l1(x), state)
        return self.l2(jax.nn.relu(h)), state


@pytest.fixture(scope="module")
def data():
    x = jax.random.normal(jax.random.key(0), (512, 2)) * 2.0 + 1.0
    y = (x[:, 0] + x[:, 1] > 2.0).astype(jnp.int32)
    return ev3.Data(propose=(x, y), assess=(x[:256], y[:256]), decide=(x[256:], y[256:]))


def _mlp(key):
    return eqx.nn.MLP(2, 2, 16, 1, key=key)


def _engine():
    proposer = ev3.GradientProposer(
        losses=[ev3.CrossEntropy(1.0), ev3.CrossEntropy(0.5)],
        optimizers=[optax.sgd(0.1, momentum=0.9)],
        steps=4,
        batch_size=32,
        on_reject="continue",
    )
    return ev3.Engine([proposer], [ev3.Accuracy()], ev3.EV3Scheduler(), 128, 256)


def _float_dtypes(tree):
    return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_computes_in_bfloat16_and_answers_in_float32():
    model = ev3.MixedPrecision(_mlp(jax.random.key(1)))
    x = jnp.ones(2)
    assert model(x).dtype == jnp.float32
    assert _float_dtypes(eqx.filter(model, eqx.is_array)) == {jnp.dtype(jnp.float32)}
    jaxpr = jax.make_jaxpr(model)(x)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in dots)
    # the same model in float32 differs by bfloat16 rounding only
    np.testing.assert_allclose(model(x), model.model(x), rtol=0.05, atol=0.05)
    stored = ev3.MixedPrecision(_mlp(jax.random.key(1)), param_dtype=jnp.bfloat16)
    assert _float_dtypes(eqx.filter(stored, eqx.is_array)) == {jnp.dtype(jnp.bfloat16)}
    assert stored(x).dtype == jnp.float32
    with pytest.raises(ConfigurationError, match="not a floating-point dtype"):
        ev3.MixedPrecision(_mlp(jax.random.key(1)), compute_dtype=jnp.int32)


@pytest.mark.parametrize("param_dtype", [None, jnp.bfloat16], ids=["f32-params", "bf16-params"])
def test_trains_checkpoints_and_resumes_exactly(data, tmp_path, param_dtype):
    engine = _engine()
    model = ev3.MixedPrecision(_mlp(jax.random.key(1)), param_dtype=param_dtype)
    want = {jnp.dtype(param_dtype or jnp.float32)}
    start = engine.init(model, jax.random.key(2))
    first, _ = ev3.run(engine, start, data, 2)
    state, infos = ev3.run(engine, first, data, 6)
    # it learned, the parameters (current, candidates' lineages, optimizer states) kept
    # their dtype, and the scores the scheduler saw are float32
    acc = lambda m: float(jnp.mean(jnp.argmax(jax.vmap(m)(data.decide[0]), -1) == data.decide[1]))
    assert acc(state.model) > acc(start.model) + 0.1
    assert int(np.sum(np.asarray(infos.accepted))) >= 1
    assert _float_dtypes(state.current) == want
    assert _float_dtypes(state.proposer_states) <= want | {jnp.dtype(jnp.float32)}
    assert infos.assess_mean.dtype == infos.decide_mean.dtype == jnp.float32
    # a checkpoint of the state after 2 steps restores it bit for bit; 6 more steps from the
    # restored state give the uninterrupted run's state
    ev3.save_checkpoint(tmp_path, first)
    loaded, _ = ev3.load_checkpoint(tmp_path, like=engine.init(model, jax.random.key(9)))
    assert state_digest(loaded) == state_digest(first)
    assert _float_dtypes(loaded.current) == want
    resumed, _ = ev3.run(engine, loaded, data, 6)
    assert state_digest(resumed) == state_digest(state)


def test_batchnorm_state_keeps_its_dtype(data):
    net, st = eqx.nn.make_with_state(BNNet)(jax.random.key(3))
    model = ev3.Stateful(ev3.MixedPrecision(net), st)
    engine = _engine()
    state = engine.init(model, jax.random.key(4))
    state, _ = ev3.run(engine, state, data, 3)
    assert _float_dtypes(state.model.state) == {jnp.dtype(jnp.float32)}
    # the running statistics moved (training mode ran through the wrapper)
    assert any(
        bool(jnp.any(a != b))
        for a, b in zip(jax.tree.leaves(state.model.state), jax.tree.leaves(st))
        if jnp.issubdtype(a.dtype, jnp.floating)
    )
    assert state.model(data.decide[0][0]).dtype == jnp.float32
