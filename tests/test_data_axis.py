"""A two-axis mesh ("candidate", "data") over the 8 virtual CPU devices: each candidate's
examples are split over "data", and the run makes the decisions of one device."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import ev3core
from ev3core._engine.engine import _jit_step
from ev3core.errors import ConfigurationError

STEPS = 3
BATCH = 48  # per trajectory step and candidate: 12 examples on each of 4 data shards
ASSESS = 62  # not a multiple of 4: the scoring pads the examples, then drops their scores
DECIDE = 256


@pytest.fixture(scope="module")
def data():
    d, _ = ev3core.toy_problem(jax.random.key(0), n=2048)
    # Assess and decide streams of exactly assess_size / decide_size examples: each step
    # scores them all (no draw to compile: the module compiles four steps, and stays fast).
    return ev3core.Data(
        d.propose,
        jax.tree.map(lambda a: a[:ASSESS], d.assess),
        jax.tree.map(lambda a: a[:DECIDE], d.decide),
    )


def _engine(k, mesh=None):
    proposer = ev3core.GradientProposer(
        [ev3core.CrossEntropy(t) for t in np.linspace(0.5, 2.0, k)],
        [optax.sgd(0.05, momentum=0.9)],
        steps=3,
        batch_size=BATCH,
    )
    return ev3core.Engine(
        [proposer],
        [ev3core.Accuracy(), ev3core.NegCrossEntropy()],
        ev3core.EV3Scheduler(0.5, 1.0),
        assess_size=ASSESS,
        decide_size=DECIDE,
        mesh=mesh,
    )


def _init(k):
    """A one-device engine with `k` candidates and its initial state."""
    engine = _engine(k)
    return engine, engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))


def _run(engine, state, data):
    infos = []
    for _ in range(STEPS):
        state, info = engine.step(state, data)
        infos.append(info)
    return state, jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(infos))


def _check_same(run, reference):
    (s, infos), (s_ref, i_ref) = run, reference
    for name in ("winner", "choice", "accepted", "significant", "valid"):
        np.testing.assert_array_equal(  # a `Choice` holds one int32 array
            *(jax.tree.leaves(getattr(i, name))[0] for i in (infos, i_ref)), err_msg=name
        )
    assert i_ref.accepted.any()  # the comparison covers accepted winners
    np.testing.assert_allclose(infos.assess_mean, i_ref.assess_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(infos.decide_mean, i_ref.decide_mean, rtol=1e-5, atol=1e-6)
    for part in ("current", "stable", "proposer_states"):
        a, b = getattr(s, part), getattr(s_ref, part)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)


@pytest.fixture(scope="module")
def mesh():
    return ev3core.candidate_mesh(candidates=2, data=4)


def test_candidate_mesh_shapes():
    assert dict(ev3core.candidate_mesh().shape) == {"candidate": 8}  # one axis, as before
    assert dict(ev3core.candidate_mesh(data=4).shape) == {"candidate": 2, "data": 4}
    m = ev3core.candidate_mesh(jax.devices()[:6], candidates=3, data=2)
    assert m.axis_names == ("candidate", "data") and dict(m.shape) == {"candidate": 3, "data": 2}
    # a data group is consecutive devices (the gradients' all-reduce stays among neighbours)
    assert list(m.devices[0]) == jax.devices()[:2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"candidates": 3, "data": 4}, r"candidates=3 x data=4 = 12 devices, but 8"),
        ({"data": 3}, r"8 devices do not split into data=3"),
        ({"data": 0}, r"data=0 must be a positive integer"),
        ({"candidates": 0, "data": 2}, r"candidates=0 must be a positive integer"),
    ],
)
def test_bad_mesh_is_refused_with_the_fix(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        ev3core.candidate_mesh(**kwargs)


def test_split_examples_is_the_identity_outside_a_two_axis_step():
    x = jnp.arange(12.0).reshape(4, 3)
    assert ev3core.split_examples(x) is x


def test_two_candidates_by_four_data_shards_match_one_device(data, mesh):
    """K=2 on a 2 x 4 mesh: one candidate per candidate shard, its examples over 4 devices.
    The trajectory minibatches really are split: the compiled step holds 12-example
    activations (48 / 4), no 48-example ones, and reduces the gradients over each data
    group of 4 devices."""
    plain, state = _init(2)
    reference = _run(plain, state, data)
    engine = _engine(2, mesh)
    # the same initial state, placed on the mesh (as a loaded checkpoint would be)
    state, sharded = ev3core.shard_state(state, mesh), ev3core.replicate(data, mesh)
    run = _run(engine, state, sharded)
    _check_same(run, reference)
    opt = jax.tree.leaves(run[0].proposer_states[0].opt_states[0][0])[0]
    assert opt.sharding.spec == P("candidate")  # one candidate's optimizer state per shard
    # the program the run compiled (its lowering is cached: no second compile)
    hlo = _jit_step.lower(*engine._split(), state, sharded).compile().as_text()
    hidden = 8  # the toy model's width
    assert re.search(rf"f32\[(1,)?{BATCH // 4},{hidden}\]", hlo)
    assert not re.search(rf"f32\[(\d+,)?{BATCH},{hidden}\]", hlo)
    # the gradients' all-reduce runs within each data group, {0..3} and {4..7}
    assert re.search(
        r"all-reduce\(.*replica_groups=(\[2,4\]<=\[8\]|\{\{0,1,2,3\},\{4,5,6,7\}\})", hlo
    )


def test_k_not_a_multiple_of_the_candidate_axis(data, mesh):
    """K=3 on a 2 x 4 mesh: padded to 4 with a masked copy of the current model; the
    3-row optimizer states stay replicated over the candidate axis, the examples are still
    split over "data"."""
    plain, state = _init(3)
    reference = _run(plain, state, data)
    run = _run(_engine(3, mesh), ev3core.shard_state(state, mesh), ev3core.replicate(data, mesh))
    assert run[1].valid.shape == (STEPS, 3) and (run[1].winner < 3).all()
    _check_same(run, reference)
