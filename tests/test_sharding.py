"""Candidate sharding over the 8 virtual CPU devices, chunking, donation, no host sync."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import ev3core
from ev3core.errors import ConfigurationError

STEPS = 3


@pytest.fixture(scope="module")
def data():
    d, _ = ev3core.toy_problem(jax.random.key(0), n=4096)
    return d


def _engine(num_losses=8, chunk=None, **kwargs):
    proposer = ev3core.GradientProposer(
        [ev3core.CrossEntropy(t) for t in np.linspace(0.5, 2.0, num_losses)],
        [optax.sgd(0.05, momentum=0.9)],
        steps=4,
        batch_size=16,
        chunk_size=chunk,
    )
    return ev3core.Engine(
        [proposer],
        [ev3core.Accuracy(), ev3core.NegCrossEntropy()],
        ev3core.EV3Scheduler(0.5, 1.0),
        assess_size=64,
        decide_size=256,
        **kwargs,
    )


def _run(engine, data, steps=STEPS):
    state = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    infos = []
    for _ in range(steps):
        state, info = engine.step(state, data)
        infos.append(info)
    return state, jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(infos))


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)


def _same_decisions(i1, i2):
    for name in ("winner", "choice", "accepted", "significant", "valid"):
        np.testing.assert_array_equal(  # a `Choice` holds one int32 array
            *(jax.tree.leaves(getattr(i, name))[0] for i in (i1, i2)), err_msg=name
        )


@pytest.fixture(scope="module")
def plain():
    return _engine()


@pytest.fixture(scope="module")
def sharded():
    return _engine(mesh=ev3core.candidate_mesh())


@pytest.fixture(scope="module")
def reference(plain, data):
    return _run(plain, data)


def test_sharded_run_matches_one_device(data, reference, sharded):
    assert sharded.mesh.devices.size == 8
    s_ref, i_ref = reference
    s, infos = _run(sharded, data)
    _same_decisions(infos, i_ref)
    assert infos.accepted.any()  # the comparison covers accepted winners
    _close(s.current, s_ref.current)
    _close(s.stable, s_ref.stable)
    _close(s.proposer_states, s_ref.proposer_states)
    # The per-candidate optimizer states really are split: one candidate per device.
    trace = jax.tree.leaves(s.proposer_states[0].opt_states[0][0])[0]
    assert trace.shape[0] == 8 and trace.sharding.spec == P("candidate")
    assert {sh.data.shape[0] for sh in trace.addressable_shards} == {1}
    assert len({sh.device for sh in trace.addressable_shards}) == 8
    # ... while the incumbents are replicated (the winner was broadcast).
    leaf = jax.tree.leaves(s.current)[0]
    assert leaf.sharding.is_fully_replicated


def test_uneven_candidates_are_padded_and_never_accepted(data, plain, reference):
    """K=8 on 3 devices: padded to 9 with a masked copy of the current model that can never
    win; the per-candidate optimizer states (8 rows) stay replicated."""
    eng = ev3core.Engine(
        plain.proposers,
        plain.assessors,
        plain.scheduler,
        64,
        256,
        mesh=ev3core.candidate_mesh(jax.devices()[:3]),
    )
    s_ref, i_ref = reference
    s, infos = _run(eng, data)
    assert infos.valid.shape == (STEPS, 8) and infos.assess_mean.shape == (STEPS, 2, 10)
    assert (infos.winner < 8).all() and infos.accepted.any()
    _same_decisions(infos, i_ref)
    _close(s.current, s_ref.current)
    _close(s.proposer_states, s_ref.proposer_states)


def test_mesh_needs_a_candidate_axis():
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    with pytest.raises(ConfigurationError, match="'candidate'"):
        _engine(mesh=mesh)
    with pytest.raises(ConfigurationError, match="chunk_size"):
        _engine(chunk_size=0)


def test_chunked_candidates_give_identical_results(data, reference):
    """Trajectories and assessment in groups of 3 (8 = 3 + 3 + 2) change nothing."""
    s_ref, i_ref = reference
    s, infos = _run(_engine(chunk=3, chunk_size=3), data)
    _same_decisions(infos, i_ref)
    _close(s.current, s_ref.current)
    _close(s.proposer_states, s_ref.proposer_states)


def test_no_host_transfer_inside_an_iteration(data, plain, sharded):
    """Once compiled, a step (and a scan of steps) never touches the host."""
    for engine in (plain, sharded):
        state = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
        data_d = ev3core.replicate(data, engine.mesh) if engine.mesh is not None else data
        state, _ = engine.step(state, data_d)  # compiled already or now
        with jax.transfer_guard("disallow"):
            state, info = engine.step(state, data_d)
            state, info = engine.step(state, data_d)
        assert info.step.sharding.is_fully_replicated
    state = plain.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    state, _ = plain.scan(state, data, 2)
    with jax.transfer_guard("disallow"):
        state, infos = plain.scan(state, data, 2)
    assert int(infos.step[-1]) == 3
    # The guard is live: a step fed host (NumPy) data is refused.
    host = jax.tree.map(np.asarray, data)
    with pytest.raises(Exception, match="[Dd]isallowed"), jax.transfer_guard("disallow"):
        plain.step(state, host)


def test_donated_step_matches_and_consumes_the_state(data, plain):
    s0 = plain.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    kept, info = plain.step(s0, data)
    donor = jax.tree.map(jnp.copy, s0)
    new, info_d = plain.step_donated(donor, data)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(kept), strict=True):
        a, b = (
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
            for x in (a, b)
        )
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # NaN == NaN here
    assert jax.tree.leaves(donor.current)[0].is_deleted()
    assert not jax.tree.leaves(s0.current)[0].is_deleted()
