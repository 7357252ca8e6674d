"""Learning rates as leaves (`Optimizer`), evolving candidates (`Evolve`), population-based
training (`PBTProposer`) and compute accounting (`gradient_evaluations`)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ev3core as ev3
from ev3core.errors import ConfigurationError


@pytest.fixture(scope="module")
def smoke():
    data, _ = ev3.toy_problem(jax.random.key(0), n=3_000)
    return data, eqx.nn.MLP(2, 2, 8, 1, key=jax.random.key(1))


def _small():
    x = jax.random.normal(jax.random.key(0), (64, 2))
    y = (x[:, 0] + x[:, 1] > 0).astype(jnp.int32)
    model = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(1))
    params, static = eqx.partition(model, eqx.is_array)
    return (x, y), params, static


def _lrs(state):
    return np.concatenate(
        [np.asarray(o.hyperparams["learning_rate"]) for per in state.opt_states for o in per]
    )


def _outcome(params, index, scores=None, changed=None):
    return ev3.Outcome(
        accepted_index=jnp.int32(index),
        accepted=jnp.bool_(index >= 0),
        significant=jnp.bool_(False),
        params=params,
        changed=None if changed is None else jnp.bool_(changed),
        scores=None if scores is None else jnp.asarray([scores], jnp.float32),
    )


# --------------------------------------------------------------------------- Optimizer specs
def _readme_engine(lr, spec=True):
    """The README's pipeline (with `lr` for the first optimizer)."""
    if spec:
        optimizers = [
            ev3.Optimizer(optax.sgd, learning_rate=lr),
            ev3.Optimizer(optax.sgd, learning_rate=0.01, momentum=0.95),
        ]
    else:
        optimizers = [optax.sgd(lr), optax.sgd(0.01, momentum=0.95)]
    proposer = ev3.GradientProposer(
        losses=[ev3.CrossEntropy(temperature=t) for t in (0.5, 1.0, 1.5)],
        optimizers=optimizers,
        steps=100,
        batch_size=32,
    )
    return ev3.Pipeline(
        [proposer],
        assessors=["accuracy", "neg_cross_entropy"],
        scheduler=ev3.EV3Scheduler(assess_alpha=0.5, decide_alpha=4.0),
        decide_size=512,
    ).build()


def test_readme_pipeline_rebuilt_or_with_a_new_learning_rate_never_retraces(smoke):
    data, model = smoke
    step = eqx.filter_jit(
        eqx.debug.assert_max_traces(lambda e, s, d: e.step_pure(s, d), max_traces=1)
    )
    infos = []
    for lr in (0.1, 0.1, 0.02):  # built, rebuilt with equal settings, new learning rate
        engine = _readme_engine(lr)
        state = engine.init(model, jax.random.key(2))
        assert float(state.proposer_states[0].opt_states[0][0].hyperparams["learning_rate"][0]) == (
            pytest.approx(lr)
        )
        _, info = step(engine, state, data)
        infos.append(info)
    # equal settings give equal results; the new learning rate changes the candidates
    np.testing.assert_array_equal(infos[0].assess_mean, infos[1].assess_mean)
    assert not np.array_equal(infos[0].assess_mean[:, :3], infos[2].assess_mean[:, :3])


def test_plain_optax_transformations_still_work_and_are_static(smoke):
    data, model = smoke
    count = [0]

    def traced(e, s, d):
        count[0] += 1
        return e.step_pure(s, d)

    step = eqx.filter_jit(traced)
    for _ in range(2):
        engine = _readme_engine(0.1, spec=False)
        _, info = step(engine, engine.init(model, jax.random.key(2)), data)
        assert bool(jnp.all(info.valid))
    assert count[0] == 2  # a rebuilt optax.sgd(0.1) is a new closure: documented re-trace


def test_optimizer_spec_splits_numbers_from_structure():
    opt = ev3.Optimizer(optax.sgd, learning_rate=0.1, momentum=0.9, nesterov=True)
    assert set(opt.hyperparams) == {"learning_rate", "momentum"}
    assert dict(opt.static_args) == {"nesterov": True}
    assert (
        opt.family
        == ev3.Optimizer(optax.sgd, learning_rate=0.5, momentum=0.1, nesterov=True).family
    )
    params = {"w": jnp.ones(3)}
    st = opt.transformation().init(params)
    ref = optax.sgd(0.1, momentum=0.9, nesterov=True)
    g = {"w": jnp.arange(3.0)}
    u, _ = opt.transformation().update(g, st, params)
    u_ref, _ = ref.update(g, ref.init(params), params)
    np.testing.assert_allclose(u["w"], u_ref["w"], rtol=1e-6)
    with pytest.raises(ConfigurationError, match="pass the function"):
        ev3.Optimizer(optax.sgd(0.1))
    with pytest.raises(ConfigurationError, match="do not fit the factory"):
        ev3.Optimizer(optax.sgd, lr=0.1)


# --------------------------------------------------------------------------- evolving candidates
def _evolving(**kw):
    return ev3.GradientProposer(
        losses=[ev3.CrossEntropy(1.0), ev3.CrossEntropy(0.25)],
        optimizers=[
            ev3.Optimizer(optax.sgd, learning_rate=0.4),
            ev3.Optimizer(optax.sgd, learning_rate=0.1),
            ev3.Optimizer(optax.adam, learning_rate=0.01),
        ],
        steps=2,
        batch_size=8,
        **kw,
    )


def test_hyperparameters_move_toward_the_accepted_candidates():
    _, params, static = _small()
    prop = _evolving(evolve=ev3.Evolve(names=("learning_rate", "temperature"), pull=0.5, sigma=0.0))
    state = prop.init(params, static, jax.random.key(0))
    # candidate 1 is (T=0.25, sgd lr=0.4): order is optimizer-major, losses in group order
    assert prop.labels()[1].startswith("ce(T=0.25)|sgd(lr=0.4")
    new = eqx.filter_jit(prop.adapt)(state, _outcome(params, 1))
    lr = _lrs(new)
    # sgd candidates move halfway (in log space) to 0.4; the accepted one keeps 0.4;
    # adam is another family and keeps its own
    np.testing.assert_allclose(lr, [0.4, 0.4, 0.2, 0.2, 0.01, 0.01], rtol=1e-5)
    temps = np.concatenate([np.asarray(p[0].temperature) for p in new.loss_params])
    np.testing.assert_allclose(temps, [0.5, 0.25, 0.5, 0.25, 0.5, 0.25], rtol=1e-5)
    # and again: distances to the accepted values keep shrinking
    newer = prop.adapt(new, _outcome(params, 1))
    assert np.all(np.abs(np.log(_lrs(newer)[:4] / 0.4)) <= np.abs(np.log(lr[:4] / 0.4)))
    # nothing of this proposer accepted: no move
    same = prop.adapt(new, _outcome(params, -1))
    np.testing.assert_array_equal(_lrs(same), lr)


def test_evolving_noise_is_keyed_and_log_normal():
    _, params, static = _small()
    prop = _evolving(evolve=ev3.Evolve(pull=0.0, sigma=0.3))
    state = prop.init(params, static, jax.random.key(0))
    a = prop.adapt(state, _outcome(params, 0))
    b = prop.adapt(state, _outcome(params, 0))
    other = prop.adapt(prop.init(params, static, jax.random.key(1)), _outcome(params, 0))
    np.testing.assert_array_equal(_lrs(a), _lrs(b))  # same key, same move
    assert not np.array_equal(_lrs(a), _lrs(other))
    assert _lrs(a)[0] == pytest.approx(0.4)  # the accepted candidate keeps its value
    assert np.all(_lrs(a) > 0) and not np.allclose(_lrs(a)[1:4], _lrs(state)[1:4])


def test_truncation_restarts_only_the_worse_lineages():
    data, params, static = _small()
    prop = ev3.GradientProposer(
        losses=[ev3.CrossEntropy()],
        optimizers=[
            ev3.Optimizer(optax.sgd, learning_rate=lr, momentum=0.9) for lr in (0.4, 0.2, 0.1, 0.05)
        ],
        steps=2,
        batch_size=8,
        on_reject="continue",
        evolve=ev3.Evolve(pull=1.0, sigma=0.0, truncate=0.5),
    )
    state = prop.init(params, static, jax.random.key(0))
    cands, state = prop.propose(params, static, state, data, jax.random.key(1))
    new_current = jax.tree.map(lambda x: x[2], cands)
    # candidate 2 accepted; candidates 0 and 3 score worst
    new = prop.adapt(state, _outcome(new_current, 2, scores=[0.1, 0.8, 0.9, 0.2], changed=True))
    lin = [jax.tree.leaves(per[0]) for per in new.lineages]
    old = [jax.tree.leaves(per[0]) for per in state.lineages]
    cur = jax.tree.leaves(new_current)
    for i in (0, 3):  # restarted from the new current, with the accepted's optimizer state
        for a, c in zip(lin[i], cur):
            np.testing.assert_array_equal(a[0], c)
        for a, c in zip(
            jax.tree.leaves(new.opt_states[i][0].inner_state),
            jax.tree.leaves(state.opt_states[2][0].inner_state),
        ):
            np.testing.assert_array_equal(a, c)
    for i in (1,):  # a better lineage continues with its own parameters and learning rate
        for a, o in zip(lin[i], old[i]):
            np.testing.assert_array_equal(a, o)
    np.testing.assert_allclose(_lrs(new), [0.1, 0.2, 0.1, 0.1], rtol=1e-6)


def test_evolving_candidates_never_retrace_across_20_steps(smoke):
    data, model = smoke
    prop = ev3.GradientProposer(
        losses=[ev3.CrossEntropy(temperature=t) for t in (0.5, 1.0)],
        optimizers=[ev3.Optimizer(optax.sgd, learning_rate=lr) for lr in (1.0, 0.1, 0.01)],
        steps=3,
        batch_size=16,
        on_reject="continue",
        evolve=ev3.Evolve(names=("learning_rate", "temperature"), truncate=0.5),
    )
    engine = ev3.Pipeline(
        [prop],
        assessors=["accuracy"],
        scheduler=ev3.EV3Scheduler(assess_alpha=0.5, decide_alpha=1.0),
        decide_size=256,
    ).build()
    step = eqx.filter_jit(
        eqx.debug.assert_max_traces(lambda e, s, d: e.step_pure(s, d), max_traces=1)
    )
    state = engine.init(model, jax.random.key(3))
    start = _lrs(state.proposer_states[0])
    accepted = 0
    for _ in range(20):
        state, info = step(engine, state, data)
        accepted += int(info.accepted)
    assert accepted > 0
    assert not np.allclose(_lrs(state.proposer_states[0]), start)


def test_evolve_bad_input():
    with pytest.raises(ConfigurationError, match="no optimizer or loss"):
        _evolving(evolve=ev3.Evolve(names=("beta",)))
    with pytest.raises(ConfigurationError, match="on_reject='continue'"):
        _evolving(evolve=ev3.Evolve(truncate=0.5))
    with pytest.raises(ConfigurationError, match="pull"):
        ev3.Evolve(pull=2.0)


# --------------------------------------------------------------------------- PBT
def _pbt(**kw):
    kw.setdefault("resample_probability", 0.0)
    return ev3.PBTProposer(
        losses=[ev3.CrossEntropy()],
        optimizers=[
            ev3.Optimizer(optax.sgd, learning_rate=lr, momentum=0.9) for lr in (0.4, 0.2, 0.1, 0.05)
        ],
        steps=2,
        batch_size=8,
        **kw,
    )


def test_pbt_exploit_copies_parameters_and_optimizer_state_explore_perturbs_hyperparameters():
    data, params, static = _small()
    pbt = _pbt()
    state = pbt.init(params, static, jax.random.key(0))
    _, state = pbt.propose(params, static, state, data, jax.random.key(1))
    _, state = pbt.propose(params, static, state, data, jax.random.key(2))
    # member 2 is the best, member 0 the worst (quantile 0.25 of 4: one member replaced)
    new = eqx.filter_jit(pbt.adapt)(state, _outcome(params, 2, scores=[0.1, 0.5, 0.9, 0.6]))
    assert pbt.num_replaced == 1
    lin_new = [jax.tree.leaves(per[0]) for per in new.lineages]
    lin_old = [jax.tree.leaves(per[0]) for per in state.lineages]
    inner_new = [jax.tree.leaves(per[0].inner_state) for per in new.opt_states]
    inner_old = [jax.tree.leaves(per[0].inner_state) for per in state.opt_states]
    assert not all(np.array_equal(a, b) for a, b in zip(lin_old[0], lin_old[2]))
    for a, b in zip(lin_new[0], lin_old[2]):  # exploit: the top member's parameters...
        np.testing.assert_array_equal(a, b)
    for a, b in zip(inner_new[0], inner_old[2]):  # ...and its optimizer state (momentum)
        np.testing.assert_array_equal(a, b)
    assert any(np.any(x != 0) for x in inner_old[2])  # a real momentum buffer was copied
    for i in (1, 2, 3):  # everyone else untouched
        for a, b in zip(lin_new[i] + inner_new[i], lin_old[i] + inner_old[i]):
            np.testing.assert_array_equal(a, b)
    lr = _lrs(new)
    assert lr[0] == pytest.approx(0.1 * 0.8) or lr[0] == pytest.approx(0.1 * 1.2)
    np.testing.assert_allclose(lr[1:], [0.2, 0.1, 0.05])
    momentum = [float(per[0].hyperparams["momentum"][0]) for per in new.opt_states]
    np.testing.assert_allclose(momentum, 0.9)  # explore perturbs only the named ones
    # resampling draws from the initial population's values
    res = _pbt(resample_probability=1.0)
    lr = _lrs(res.adapt(state, _outcome(params, 2, scores=[0.1, 0.5, 0.9, 0.6])))
    assert any(lr[0] == pytest.approx(v) for v in (0.4, 0.2, 0.1, 0.05))


def test_pbt_hyperparameter_changes_never_recompile_and_the_best_member_is_returned(smoke):
    data, model = smoke
    step = eqx.filter_jit(
        eqx.debug.assert_max_traces(lambda e, s, d: e.step_pure(s, d), max_traces=1)
    )
    for lrs in ((1.0, 0.3, 0.1, 0.03), (0.5, 0.05, 0.02, 0.01)):
        pbt = ev3.PBTProposer(
            losses=[ev3.CrossEntropy()],
            optimizers=[ev3.Optimizer(optax.sgd, learning_rate=lr) for lr in lrs],
            steps=3,
            batch_size=16,
        )
        engine = ev3.Pipeline(
            [pbt], assessors=["accuracy"], scheduler="always_accept", decide_size=256
        ).build()
        state = engine.init(model, jax.random.key(4))
        seen = set()
        for _ in range(4):  # exploit/explore changes the learning rates inside the state
            state, info = step(engine, state, data)
            seen.add(tuple(np.round(_lrs(state.proposer_states[0]), 6)))
            winner = int(info.winner)
            assert info.assess_mean[0, winner] == np.max(info.assess_mean[0, :4])
            assert bool(info.accepted)  # the current model is the best member
        assert len(seen) > 1


def test_pbt_bad_input():
    with pytest.raises(ConfigurationError, match="one family"):
        ev3.PBTProposer(
            [ev3.CrossEntropy()],
            [
                ev3.Optimizer(optax.sgd, learning_rate=0.1),
                ev3.Optimizer(optax.adam, learning_rate=0.1),
            ],
        )
    with pytest.raises(ConfigurationError, match="quantile"):
        _pbt(quantile=0.75)
    with pytest.raises(ConfigurationError, match="no optimizer or loss"):
        _pbt(names=("temperature2",))


def test_pbt_is_registered_and_passes_the_kit():
    import ev3core.testing as et

    assert (
        ev3.make(
            "proposer",
            "pbt",
            losses=[ev3.CrossEntropy()],
            optimizers=[
                ev3.Optimizer(optax.sgd, learning_rate=0.1),
                ev3.Optimizer(optax.sgd, learning_rate=0.2),
            ],
        ).num_candidates
        == 2
    )
    ran = et.check_registered("proposer", "pbt")
    assert {"structure", "jit", "pure", "no_recompile"} <= set(ran)


# --------------------------------------------------------------------------- compute accounting
def _optimizer_updates(state):
    """Optimizer updates actually taken, from `inject_hyperparams`' step counters."""
    return int(sum(int(jnp.sum(o.count)) for per in state.opt_states for o in per))


class _Gradientless(ev3.AbstractProposer):
    @property
    def num_candidates(self):
        return 1

    def labels(self):
        return ("same",)

    def adapt(self, state, outcome):
        return state

    def init(self, params, static, key):
        return None

    def propose(self, params, static, state, data, key):
        return jax.tree.map(lambda x: x[None], params), state


def test_gradient_evaluations_count_what_a_step_spends(smoke):
    data, model = smoke
    ev3_prop = ev3.GradientProposer(
        losses=[ev3.CrossEntropy(temperature=t) for t in (0.5, 1.0)],
        optimizers=[ev3.Optimizer(optax.sgd, learning_rate=lr) for lr in (0.3, 0.03)],
        steps=3,
        max_steps=6,
        patience=1,
        batch_size=16,
        on_reject="continue",
    )
    pbt = ev3.PBTProposer(
        losses=[ev3.CrossEntropy()],
        optimizers=[ev3.Optimizer(optax.sgd, learning_rate=lr) for lr in (1.0, 0.3, 0.1, 0.03)],
        steps=3,
        batch_size=16,
    )
    counted = {}
    for prop, scheduler in ((ev3_prop, "ev3"), (pbt, "always_accept")):
        engine = ev3.Pipeline([prop], scheduler=scheduler, decide_size=256).build()
        assert ev3.gradient_evaluations(engine) == 4 * 3  # equal compute: K=4, L=N=3
        assert ev3.gradient_evaluations(engine, examples=True) == 4 * 3 * 16
        propose = eqx.filter_jit(prop.propose)
        state = engine.init(model, jax.random.key(0))
        counted[scheduler] = []
        for _ in range(3):
            ps = state.proposer_states[0]
            # optimizer updates one explore takes, from inject_hyperparams' step counters
            _, after = propose(state.current, state.static, ps, data.propose, jax.random.key(5))
            taken = _optimizer_updates(after) - _optimizer_updates(ps)
            assert taken == ev3.gradient_evaluations(engine, state)
            counted[scheduler].append(taken)
            state, _ = engine.step(state, data)
    assert counted["always_accept"] == [12, 12, 12]
    # a grown trajectory is counted at its grown length
    engine = ev3.Pipeline([ev3_prop], decide_size=256).build()
    state = engine.init(model, jax.random.key(0))
    ps = eqx.tree_at(lambda s: s.length, state.proposer_states[0], jnp.int32(5))
    state = eqx.tree_at(lambda s: s.proposer_states, state, (ps,))
    _, after = eqx.filter_jit(ev3_prop.propose)(
        state.current, state.static, ps, data.propose, jax.random.key(5)
    )
    assert _optimizer_updates(after) - _optimizer_updates(ps) == 4 * 5
    assert ev3.gradient_evaluations(engine, state) == 4 * 5
    with pytest.raises(ConfigurationError, match="not one of ev3core's gradient proposers"):
        ev3.gradient_evaluations([_Gradientless()])
