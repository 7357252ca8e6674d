"""Models with BatchNorm state and dropout (`ev3core.Stateful`) through the whole engine:
proposers train in training mode with per-step keys and thread the running statistics;
assessors score in inference mode; the state is part of candidates, incumbents, checkpoints
and shards."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ev3core as ev3
from ev3core._host.ckpt_format import state_digest
from ev3core.errors import ConfigurationError


class BNNet(eqx.Module):
    """Linear - BatchNorm - ReLU - Dropout - Linear, the Equinox way (`model(x, state, key)`)."""

    l1: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    drop: eqx.nn.Dropout
    l2: eqx.nn.Linear

    def __init__(self, key, p=0.25):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(2, 8, key=k1)
        self.bn = eqx.nn.BatchNorm(8, "batch", momentum=0.5, mode="ema")
        self.drop = eqx.nn.Dropout(p)
        self.l2 = eqx.nn.Linear(8, 2, key=k2)

    def __call__(self, x, state, *, key=None):
        h, state = self.bn(self.l1(x), state)
        return self.l2(self.drop(jax.nn.relu(h), key=key)), state


class DropNet(eqx.Module):
    """Dropout only: no state (`model(x, key)`)."""

    l1: eqx.nn.Linear
    drop: eqx.nn.Dropout
    l2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(2, 8, key=k1)
        self.drop = eqx.nn.Dropout(0.5)
        self.l2 = eqx.nn.Linear(8, 2, key=k2)

    def __call__(self, x, *, key=None):
        return self.l2(self.drop(jax.nn.relu(self.l1(x)), key=key))


def _stats(model):
    return jax.tree.leaves(model.state)


@pytest.fixture(scope="module")
def data():
    x = jax.random.normal(jax.random.key(0), (512, 2)) * 2.0 + 1.0
    y = (x[:, 0] + x[:, 1] > 2.0).astype(jnp.int32)
    return ev3.Data(propose=(x, y), assess=(x, y), decide=(x, y))


def _engine(mesh=None):
    proposer = ev3.GradientProposer(
        losses=[ev3.CrossEntropy(t) for t in np.linspace(0.5, 2.0, 8)],
        optimizers=[optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9))],
        steps=3,
        batch_size=32,
        on_reject="continue",
    )
    return ev3.Engine([proposer], [ev3.Accuracy()], ev3.EV3Scheduler(), 64, 256, mesh=mesh)


@pytest.fixture(scope="module")
def engine():
    return _engine()


@pytest.fixture(scope="module")
def model():
    m, s = eqx.nn.make_with_state(BNNet)(jax.random.key(1))
    return ev3.Stateful(m, s)


@pytest.fixture(scope="module")
def reference(engine, model, data):
    """Three single steps from one initial state."""
    state = engine.init(model, jax.random.key(2))
    states = [state]
    for _ in range(3):
        state, _ = engine.step(state, data)
        states.append(state)
    return states


def test_assessors_score_in_inference_mode(model, data):
    x = data.assess[0][:16]
    a, b = jax.vmap(model)(x), jax.vmap(model)(x)  # no key: dropout is off, BN uses stats
    assert bool(jnp.all(a == b))
    m = eqx.nn.inference_mode(model.model)
    by_hand = jax.vmap(lambda xi: m(xi, model.state)[0])(x)
    np.testing.assert_allclose(a, by_hand, rtol=1e-6)


def test_training_view_is_batch_level_and_keyed(model, data):
    x = data.propose[0][:32]
    v1, v2 = model.training(jax.random.key(0)), model.training(jax.random.key(1))
    y1, y1b = ev3.batch_apply(v1, x), ev3.batch_apply(v1, x)
    assert bool(jnp.all(y1 == y1b))  # the same key, the same dropout masks
    assert not bool(jnp.all(y1 == ev3.batch_apply(v2, x)))  # another key, other masks
    # training mode normalises with the batch's statistics: not the inference outputs
    assert not bool(jnp.allclose(y1, jax.vmap(model)(x)))
    with pytest.raises(ConfigurationError, match="batch_apply"):
        jax.vmap(v1)(x)


def test_proposer_threads_the_statistics_per_candidate(engine, model, data):
    params, static = eqx.partition(model, eqx.is_array)
    p = engine.proposers[0]
    ps = p.init(params, static, jax.random.key(0))
    # optimizer states cover the weights only, never the running statistics
    assert jax.tree.structure(ps.opt_states[0][0][1][0].trace) == jax.tree.structure(params.model)
    cands, _ = eqx.filter_jit(p.propose)(params, static, ps, data.propose, jax.random.key(1))
    mean = _stats(cands)[1]  # [candidate, 8]: running means
    assert mean.shape == (8, 8)
    assert not bool(jnp.allclose(mean[0], mean[1]))  # each candidate has its own
    assert bool(jnp.all(~_stats(cands)[0]))  # first-batch flags cleared by training


def test_step_and_scan_with_batchnorm_and_dropout(engine, model, data, reference):
    states = reference
    assert int(states[-1].step) == 3
    init_stats = _stats(states[0].current)
    # the proposers' lineages carry statistics that moved away from their initial values
    lineage_mean = _stats(states[1].proposer_states[0].lineages[0][0])[1]
    assert not bool(jnp.allclose(lineage_mean[0], init_stats[1]))
    # scan gives the same states as repeated steps (determinism under the state's key)
    scanned, infos = engine.scan(states[0], data, 3)
    assert infos.step.shape == (3,)
    assert bool(jnp.all(jax.random.key_data(scanned.key) == jax.random.key_data(states[-1].key)))
    parts = lambda s: (s.current, s.stable, s.proposer_states, s.history)  # noqa: E731
    for a, b in zip(
        jax.tree.leaves(parts(scanned)), jax.tree.leaves(parts(states[-1])), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_dropout_only_model(data):
    proposer = ev3.GradientProposer(
        losses=[ev3.CrossEntropy(1.0)],
        optimizers=[optax.sgd(0.1, momentum=0.9)],
        steps=2,
        batch_size=16,
    )
    engine = ev3.Engine([proposer], [ev3.Accuracy()], ev3.EV3Scheduler(), 64, 128)
    state = engine.init(ev3.Stateful(DropNet(jax.random.key(0)), None), jax.random.key(1))
    engine.check_data(data, state)
    new, info = engine.step(state, data)
    assert bool(info.valid.all())
    trace = jax.tree.leaves(new.proposer_states[0].opt_states[0][0][0].trace)
    assert any(bool(jnp.any(x != 0)) for x in trace)  # it trained (with dropout keys)


def test_checkpoint_round_trip_and_exact_resume(engine, model, data, reference, tmp_path):
    states = reference
    ev3.save_checkpoint(tmp_path, states[1])
    like = engine.init(model, jax.random.key(99))
    loaded, _ = ev3.load_checkpoint(tmp_path, like=like)
    assert isinstance(loaded.model, ev3.Stateful)
    assert state_digest(loaded) == state_digest(states[1])
    resumed = loaded
    for _ in range(2):
        resumed, _ = engine.step(resumed, data)
    assert state_digest(resumed) == state_digest(states[3])


def test_sharded_over_eight_devices_matches_one_device(model, data, reference):
    sharded = _engine(mesh=ev3.candidate_mesh())
    assert sharded.mesh.devices.size == 8
    state = sharded.init(model, jax.random.key(2))
    for _ in range(3):
        state, _ = sharded.step(state, data)
    ref = reference[-1]
    for a, b in zip(jax.tree.leaves(state.current), jax.tree.leaves(ref.current), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    mean = _stats(state.proposer_states[0].lineages[0][0])[1]
    assert mean.sharding.spec == jax.sharding.PartitionSpec("candidate")
    assert {sh.data.shape[0] for sh in mean.addressable_shards} == {1}


@pytest.mark.parametrize("kind", ["proposer", "assessor"])
def test_builtin_components_conform_on_the_stateful_problem(kind):
    import ev3core.testing as et

    problem = et.stateful_problem()
    if kind == "proposer":
        for proposer in [
            ev3.GradientProposer(
                [ev3.CrossEntropy(1.0), ev3.CrossEntropy(0.5)],
                [ev3.Optimizer(optax.sgd, learning_rate=0.1, momentum=0.9)],
                steps=2,
                batch_size=8,
                on_reject="continue",
            )
        ]:
            assert et.check_proposer(proposer, problem=problem)
    else:
        for assessor in [ev3.Accuracy(), ev3.NegCrossEntropy(), ev3.NegBrierScore()]:
            assert et.check_assessor(assessor, problem=problem)
