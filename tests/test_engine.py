"""Engine behaviour on the smoke problem and its building blocks."""

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ev3core
from ev3core import CURRENT, STABLE, WINNER
from ev3core._host.smoke import smoke_pipeline
from ev3core._types import tree_index, tree_stack

N = 20_000  # examples per split: plenty for 2048-example decide batches, quick to build


@pytest.fixture(scope="module")
def problem():
    data, test = ev3core.toy_problem(jax.random.key(0), n=N)
    return data, test


@pytest.fixture(scope="module")
def engine(builtin_plugins):
    return smoke_pipeline(plugins=builtin_plugins).build()


def _host(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def _leaves_equal(a, b) -> bool:
    """Bit-for-bit equality of every leaf (NaN equals NaN; keys compared by their data)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        x, y = _host(x), _host(y)
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.tobytes() != y.tobytes():
            return False
    return True


# ------------------------------------------------------------------ the smoke run
def test_smoke_run_is_accurate_and_safe(problem, engine, builtin_plugins):
    data, (x_test, y_test) = problem
    state = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    start_acc = float(ev3core.Accuracy()(state.model, (x_test, y_test)).mean())
    state, infos = ev3core.run(engine, state, data, 25, plugins=builtin_plugins)
    acc = float(ev3core.Accuracy()(state.model, (x_test, y_test)).mean())
    assert start_acc < 0.9 < 0.97 <= acc
    assert infos.accepted.sum() >= 1 and infos.significant.sum() >= 1
    # Never accept a candidate significantly worse than the current model on the decide set.
    alpha = float(engine.scheduler.decide_alpha)
    for i in np.flatnonzero(infos.accepted):
        assert infos.decide_upper[i, WINNER] >= infos.decide_lower[i, CURRENT]
        assert infos.decide_lower[i, WINNER] >= infos.decide_lower[i, CURRENT]
    assert alpha == 4.0
    # significant steps really beat the stable model
    for i in np.flatnonzero(infos.significant):
        assert infos.decide_lower[i, WINNER] > infos.decide_upper[i, STABLE]


def test_smoke_run_with_the_default_paired_bound(problem, builtin_plugins):
    """The library default (paired bound, intervals relative to the current model): every
    accepted winner is significantly better than the current model on the decide set, and
    every significant step beats the stable model there."""
    data, (x_test, y_test) = problem
    p = builtin_plugins
    eng = smoke_pipeline(plugins=p, scheduler=ev3core.EV3Scheduler(0.5, 4.0)).build()
    assert isinstance(eng.scheduler.bound, ev3core.PairedBound)
    state = eng.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    state, infos = ev3core.run(eng, state, data, 25, plugins=p)
    assert float(ev3core.Accuracy()(state.model, (x_test, y_test)).mean()) >= 0.97
    assert infos.accepted.sum() >= 1
    for i in np.flatnonzero(infos.accepted):
        assert infos.decide_lower[i, WINNER] > 0.0  # lower bound of (winner - current)
        assert infos.decide_mean[i, 0, WINNER] > infos.decide_mean[i, 0, CURRENT]
    for i in np.flatnonzero(infos.significant):
        assert infos.decide_mean[i, 0, WINNER] > infos.decide_mean[i, 0, STABLE]
    kept = ~infos.accepted & ~infos.rolled_back
    assert (infos.decide_lower[kept, CURRENT] == 0.0).all()  # current is the reference


class _Saboteur(ev3core.AbstractProposer):
    """Proposes badly damaged parameters: large noise on every weight."""

    scale: jax.Array = eqx.field(converter=jnp.asarray, default=3.0)

    @property
    def num_candidates(self):
        return 4

    def labels(self):
        return ("sabotage",) * 4

    def adapt(self, state, outcome):
        return state

    def init(self, params, static, key):
        return None

    def propose(self, params, static, state, data, key):
        leaves, tdef = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        out = [
            x[None] + self.scale * jax.random.normal(k, (4,) + x.shape)
            for x, k in zip(leaves, keys)
        ]
        return jax.tree.unflatten(tdef, out), state


def test_bad_candidates_are_never_accepted_once_the_model_is_good(problem, builtin_plugins):
    """With an assess set of 8 examples, noise candidates often win assessment; the decide
    rule must still refuse every one that is significantly worse."""
    data, (x_test, y_test) = problem
    p = builtin_plugins
    eng = smoke_pipeline(plugins=p, assess_size=8).build()
    state = eng.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    state, _ = ev3core.run(eng, state, data, 8, plugins=p)  # a good model first
    good_acc = float(ev3core.Accuracy()(state.model, (x_test, y_test)).mean())
    sab = ev3core.Engine(
        [_Saboteur()], eng.assessors, eng.scheduler, assess_size=8, decide_size=2048
    )
    sstate = sab.init(state.model, jax.random.key(3))
    sstate, infos = ev3core.run(sab, sstate, data, 20, plugins=p)
    assert not infos.accepted.any()
    assert _leaves_equal(sstate.current, state.current)
    assert float(ev3core.Accuracy()(sstate.model, (x_test, y_test)).mean()) == good_acc
    # AlwaysAccept, by contrast, takes them and loses accuracy: the safety control matters.
    naive = ev3core.Engine(
        [_Saboteur()], eng.assessors, ev3core.AlwaysAccept(), assess_size=8, decide_size=2048
    )
    nstate, ninfos = ev3core.run(
        naive, naive.init(state.model, jax.random.key(3)), data, 5, plugins=p
    )
    assert ninfos.accepted.all()
    assert float(ev3core.Accuracy()(nstate.model, (x_test, y_test)).mean()) < good_acc - 0.05


# ------------------------------------------------------------------ compilation and purity
def test_hyperparameter_changes_never_retrace(problem, engine, builtin_plugins):
    data, _ = problem
    counted = eqx.filter_jit(
        eqx.debug.assert_max_traces(lambda e, s, d: e.step_pure(s, d), max_traces=1)
    )
    state = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    e = engine
    for t, a in [(0.5, 0.5), (2.0, 1.0), (3.0, 0.1)]:
        e = eqx.tree_at(lambda e: e.proposers[0].losses[0].temperature, e, jnp.float32(t))
        e = eqx.tree_at(lambda e: e.scheduler.assess_alpha, e, jnp.float32(a))
        e = eqx.tree_at(lambda e: e.scheduler.decide_alpha, e, jnp.float32(a + 1))
        state, _ = counted(e, state, data)
    # ... and the library's own jitted step says when it traces: once.
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("ev3core")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        fresh = smoke_pipeline(
            plugins=builtin_plugins, history_size=17
        ).build()  # a new static config: one trace
        s = fresh.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
        for t in (0.7, 1.3, 2.1):
            fresh = eqx.tree_at(
                lambda e: e.proposers[0].losses[1].temperature, fresh, jnp.float32(t)
            )
            s, _ = fresh.step(s, data)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    traces = [r for r in records if "tracing the EV3 step" in r.getMessage()]
    assert len(traces) == 1


def test_same_key_same_result_and_scan_matches_steps(problem, engine):
    data, _ = problem
    model = ev3core.toy_model(jax.random.key(1))
    s1 = engine.init(model, jax.random.key(5))
    s2 = engine.init(model, jax.random.key(5))
    for _ in range(3):
        s1, i1 = engine.step(s1, data)
        s2, i2 = engine.step(s2, data)
    assert _leaves_equal(s1, s2) and _leaves_equal(i1, i2)
    s3 = engine.init(model, jax.random.key(6))
    s3, _ = engine.step(s3, data)
    assert not _leaves_equal(s1.current, s3.current)  # the key matters
    # Many iterations in one lax.scan make the same decisions.
    s4, infos = engine.scan(engine.init(model, jax.random.key(5)), data, 3)
    assert (
        int(ev3core.choice_index(infos.choice)[-1]) == int(ev3core.choice_index(i1.choice))
        and int(s4.step) == 3
    )
    for a, b in zip(jax.tree.leaves(s4.current), jax.tree.leaves(s1.current)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the Choice enumeration
def test_choice_positions_names_and_traced_selection():
    Choice = ev3core.Choice
    items = (Choice.winner, Choice.current, Choice.stable)
    assert [ev3core.Choice[c] for c in items] == ["winner", "current", "stable"]
    assert [int(ev3core.choice_index(c)) for c in items] == [WINNER, CURRENT, STABLE]
    for i, c in enumerate(items):
        assert bool(ev3core.choice_at(i) == c) and isinstance(ev3core.choice_at(i), Choice)
    assert bool(ev3core.choice_at(7) == Choice.current)  # any other position keeps
    picked = jax.jit(lambda p: Choice.where(p, Choice.winner, Choice.stable))(jnp.array(False))
    assert isinstance(picked, Choice) and bool(picked == Choice.stable)
    many = jax.vmap(ev3core.choice_at)(jnp.array([2, 0, 1], jnp.int32))
    np.testing.assert_array_equal(ev3core.choice_index(many), [STABLE, WINNER, CURRENT])
    assert ev3core.Choice[many] == str(np.array(["stable", "winner", "current"]))
    stray = jax.tree.map(lambda v: v + 5, Choice.winner)  # no item: position -1
    assert int(ev3core.choice_index(stray)) == -1
    with pytest.raises(TypeError, match="Choice"):
        ev3core.choice_index(jnp.int32(0))


def test_step_info_choice_is_a_choice_that_survives_vmap_over_seeds(problem, engine):
    data, _ = problem
    model = ev3core.toy_model(jax.random.key(1))
    state = engine.init(model, jax.random.key(5))
    _, info = engine.step(state, data)
    assert isinstance(info.choice, ev3core.Choice)
    assert ev3core.Choice[info.choice] in ("winner", "current", "stable")
    assert bool(info.accepted) == bool(info.choice == ev3core.Choice.winner)
    assert bool(info.rolled_back) == bool(info.choice == ev3core.Choice.stable)
    # One engine step per seed under jax.vmap, as the value benchmark runs it.
    states = tree_stack([engine.init(model, jax.random.key(k)) for k in (5, 6)])
    seeds = eqx.filter_jit(lambda e, s, d: jax.vmap(lambda x: e.step_pure(x, d))(s))
    _, infos = seeds(engine, states, data)
    assert isinstance(infos.choice, ev3core.Choice)
    positions = ev3core.choice_index(infos.choice)
    assert positions.shape == (2,)
    assert int(positions[0]) == int(ev3core.choice_index(info.choice))
    np.testing.assert_array_equal(infos.accepted, positions == WINNER)


# ------------------------------------------------------------------ gradient proposer
def _const_loss_problem():
    x = jnp.ones((16, 2))
    y = jnp.zeros((16,), jnp.int32)
    return (x, y), eqx.nn.Linear(2, 2, key=jax.random.key(0))


class _ZeroLoss(ev3core.AbstractLoss):
    @property
    def label(self):
        return type(self).__name__

    def __call__(self, model, batch, key):
        return 0.0 * jnp.sum(jax.vmap(model)(batch[0]))


def test_optax_sees_the_trajectory_params_so_weight_decay_compounds():
    batch, model = _const_loss_problem()
    params, static = eqx.partition(model, eqx.is_array)
    lr, wd, steps = 0.1, 0.5, 10
    opt = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))
    prop = ev3core.GradientProposer([_ZeroLoss()], [opt], steps=steps, batch_size=4)
    cands, _ = prop.propose(
        params, static, prop.init(params, static, jax.random.key(9)), batch, jax.random.key(0)
    )
    expected = jax.tree.map(lambda p: p * (1 - lr * wd) ** steps, params)
    for c, e in zip(jax.tree.leaves(cands), jax.tree.leaves(expected)):
        np.testing.assert_allclose(c[0], e, rtol=1e-5)


def test_grid_order_labels_and_temperature_enter_the_loss():
    data, _ = ev3core.toy_problem(jax.random.key(0), n=512)
    model = ev3core.toy_model(jax.random.key(1))
    params, static = eqx.partition(model, eqx.is_array)
    prop = ev3core.GradientProposer(
        [ev3core.CrossEntropy(t) for t in (0.5, 1.0)],
        [optax.sgd(0.1), optax.sgd(0.0)],
        steps=5,
        batch_size=8,
        optimizer_names=["fast", "frozen"],
    )
    assert prop.labels() == ("ce(T=0.5)|fast", "ce(T=1)|fast", "ce(T=0.5)|frozen", "ce(T=1)|frozen")
    st = prop.init(params, static, jax.random.key(9))
    cands, _ = prop.propose(params, static, st, data.propose, jax.random.key(0))
    moved = [not _leaves_equal(tree_index(cands, i), params) for i in range(4)]
    assert moved == [True, True, False, False]  # lr 0 leaves params unchanged
    # different temperatures give different trajectories
    assert not _leaves_equal(
        jax.tree.map(lambda c: c[0], cands), jax.tree.map(lambda c: c[1], cands)
    )


def test_inject_hyperparams_learning_rate_lives_in_state_and_does_not_retrace():
    data, _ = ev3core.toy_problem(jax.random.key(0), n=512)
    model = ev3core.toy_model(jax.random.key(1))
    params, static = eqx.partition(model, eqx.is_array)
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    prop = ev3core.GradientProposer([ev3core.CrossEntropy()], [opt], steps=3, batch_size=8)
    propose = eqx.filter_jit(eqx.debug.assert_max_traces(prop.propose, max_traces=1))
    st = prop.init(params, static, jax.random.key(9))
    c1, _ = propose(params, static, st, data.propose, jax.random.key(0))
    zero_lr = eqx.tree_at(
        lambda s: s.opt_states[0][0].hyperparams["learning_rate"], st, jnp.zeros((1,))
    )
    c2, _ = propose(params, static, zero_lr, data.propose, jax.random.key(0))
    assert not _leaves_equal(jax.tree.map(lambda c: c[0], c1), params)
    assert _leaves_equal(jax.tree.map(lambda c: c[0], c2), params)


@pytest.mark.parametrize("policy", ["keep", "reset", "copy"])
def test_rejected_candidate_optimizer_state_policy(policy):
    data, _ = ev3core.toy_problem(jax.random.key(0), n=512)
    params, static = eqx.partition(ev3core.toy_model(jax.random.key(1)), eqx.is_array)
    prop = ev3core.GradientProposer(
        [ev3core.CrossEntropy(t) for t in (0.5, 1.0, 2.0)],
        [optax.sgd(0.1, momentum=0.9)],
        steps=4,
        batch_size=8,
        on_reject=policy,
    )
    _, st = prop.propose(
        params,
        static,
        prop.init(params, static, jax.random.key(9)),
        data.propose,
        jax.random.key(0),
    )
    trace = st.opt_states[0][0][0].trace  # momentum buffers, stacked [3, ...]
    new_params = jax.tree.map(lambda p: p + 1.0, params)
    out = prop.adapt(
        st,
        ev3core.Outcome(
            accepted_index=jnp.int32(1),
            accepted=jnp.bool_(True),
            significant=jnp.bool_(False),
            params=new_params,
        ),
    )
    after = out.opt_states[0][0][0].trace
    for before_leaf, after_leaf in zip(jax.tree.leaves(trace), jax.tree.leaves(after)):
        assert np.array_equal(after_leaf[1], before_leaf[1])  # the accepted one keeps its own
        if policy == "keep":
            assert np.array_equal(after_leaf, before_leaf)
        elif policy == "reset":
            assert not np.any(after_leaf[0]) and not np.any(after_leaf[2])  # fresh init = 0
        else:
            assert np.array_equal(after_leaf[0], before_leaf[1])
            assert np.array_equal(after_leaf[2], before_leaf[1])
    none = prop.adapt(
        st,
        ev3core.Outcome(
            accepted_index=jnp.int32(-1),
            accepted=jnp.bool_(False),
            significant=jnp.bool_(False),
            params=params,
        ),
    )
    if policy != "reset":
        assert _leaves_equal(none, st)


class _SumLoss(ev3core.AbstractLoss):
    """The sum of every parameter: its gradient is 1 everywhere, so each SGD step moves every
    parameter by exactly `-lr` and a trajectory's length can be read off its endpoint."""

    @property
    def label(self):
        return type(self).__name__

    def __call__(self, model, batch, key):
        del batch, key
        return sum(jnp.sum(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


def _moved(candidates, params, k):
    """How far candidate `k` moved from `params` (the same for every leaf)."""
    deltas = [
        np.asarray(c[k] - p) for c, p in zip(jax.tree.leaves(candidates), jax.tree.leaves(params))
    ]
    return float(np.mean(np.concatenate([d.ravel() for d in deltas])))


def _outcome(params, accepted=False, index=-1, changed=None):
    return ev3core.Outcome(
        accepted_index=jnp.int32(index),
        accepted=jnp.bool_(accepted),
        significant=jnp.bool_(False),
        params=params,
        changed=None if changed is None else jnp.bool_(changed),
    )


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_continue_policy_lineages_go_on_until_the_current_model_changes(chunk_size):
    data, _ = ev3core.toy_problem(jax.random.key(0), n=64)
    params, static = eqx.partition(ev3core.toy_model(jax.random.key(1)), eqx.is_array)
    prop = ev3core.GradientProposer(
        [_SumLoss(), _SumLoss()],
        [optax.sgd(0.01)],
        steps=4,
        batch_size=8,
        on_reject="continue",
        chunk_size=chunk_size,
    )
    st = prop.init(params, static, jax.random.key(2))
    propose = eqx.filter_jit(prop.propose)
    c1, st = propose(params, static, st, data.propose, jax.random.key(3))
    np.testing.assert_allclose(_moved(c1, params, 0), -0.04, rtol=1e-4)
    # Nothing accepted: each lineage goes on from its own endpoint (8 steps in all).
    st = prop.adapt(st, _outcome(params))
    c2, st = propose(params, static, st, data.propose, jax.random.key(4))
    np.testing.assert_allclose(_moved(c2, params, 1), -0.08, rtol=1e-4)
    # Accepted: every lineage restarts from the new current model.
    new = jax.tree.map(lambda c: c[1], c2)
    st_acc = prop.adapt(st, _outcome(new, accepted=True, index=1))
    c3, _ = propose(new, static, st_acc, data.propose, jax.random.key(5))
    np.testing.assert_allclose(_moved(c3, new, 0), -0.04, rtol=1e-4)
    # Rolled back (the current model changed, nothing accepted): restart as well.
    st_rb = prop.adapt(st, _outcome(params, changed=True))
    c4, _ = propose(params, static, st_rb, data.propose, jax.random.key(6))
    np.testing.assert_allclose(_moved(c4, params, 1), -0.04, rtol=1e-4)
    # "copy" (the default before) restarts every iteration: 4 steps, not 8.
    copy = ev3core.GradientProposer(
        [_SumLoss(), _SumLoss()], [optax.sgd(0.01)], steps=4, batch_size=8, on_reject="copy"
    )
    s = copy.init(params, static, jax.random.key(2))
    _, s = copy.propose(params, static, s, data.propose, jax.random.key(3))
    s = copy.adapt(s, _outcome(params))
    c5, _ = copy.propose(params, static, s, data.propose, jax.random.key(4))
    np.testing.assert_allclose(_moved(c5, params, 1), -0.04, rtol=1e-4)


def test_continue_policy_restarts_a_non_finite_lineage_with_a_fresh_optimizer_state():
    data, _ = ev3core.toy_problem(jax.random.key(0), n=64)
    params, static = eqx.partition(ev3core.toy_model(jax.random.key(1)), eqx.is_array)
    prop = ev3core.GradientProposer(
        [ev3core.CrossEntropy(1.0), ev3core.CrossEntropy(2.0)],
        [optax.sgd(0.1, momentum=0.9)],
        steps=3,
        batch_size=8,
        on_reject="continue",
    )
    _, st = prop.propose(
        params,
        static,
        prop.init(params, static, jax.random.key(2)),
        data.propose,
        jax.random.key(3),
    )
    (lineages,) = st.lineages[0]
    broken = jax.tree.map(lambda x: x.at[0].set(jnp.nan), lineages)
    st = eqx.tree_at(lambda s: s.lineages, st, ((broken,),))
    out = prop.adapt(st, _outcome(params))
    (after,) = out.lineages[0]
    trace_before = st.opt_states[0][0][0].trace
    trace_after = out.opt_states[0][0][0].trace
    for a, b, p, tb, ta in zip(
        jax.tree.leaves(after),
        jax.tree.leaves(lineages),
        jax.tree.leaves(params),
        jax.tree.leaves(trace_before),
        jax.tree.leaves(trace_after),
    ):
        assert np.array_equal(a[0], p)  # restarted from the current model
        assert np.array_equal(a[1], b[1])  # the finite lineage goes on
        assert not np.any(ta[0]) and np.any(tb[0])  # a fresh momentum buffer
        assert np.array_equal(ta[1], tb[1])


class _AlwaysRollBack(ev3core.AbstractScheduler):
    """Wraps `AlwaysAccept` (final: wrapped, not subclassed) and always rolls back."""

    inner: ev3core.AlwaysAccept = ev3core.AlwaysAccept()

    def bind(self, assessors):
        return self

    def init(self, num_objectives, key):
        return self.inner.init(num_objectives, key)

    def select(self, scores, valid, state, history):
        return self.inner.select(scores, valid, state, history)

    def decide(self, scores, winner_valid, state, history):
        decision, state = self.inner.decide(scores, winner_valid, state, history)
        decision = eqx.tree_at(
            lambda d: (d.choice, d.update_stable),
            decision,
            (ev3core.Choice.stable, jnp.bool_(False)),
        )
        return decision, state


def test_engine_tells_continue_lineages_when_the_current_model_rolls_back():
    data, _ = ev3core.toy_problem(jax.random.key(0), n=256)
    model = ev3core.toy_model(jax.random.key(1))
    params = eqx.filter(model, eqx.is_array)

    def build(scheduler):
        return ev3core.Engine(
            proposers=[
                ev3core.GradientProposer(
                    [_SumLoss()], [optax.sgd(0.01)], steps=4, batch_size=8, on_reject="continue"
                )
            ],
            assessors=[ev3core.Accuracy()],
            scheduler=scheduler,
            assess_size=64,
            decide_size=64,
        )

    # Never moves (a bound no candidate can pass): the lineage keeps going, 2 x 4 steps.
    never = build(ev3core.EV3Scheduler(decide_alpha=1e6))
    state = never.init(model, jax.random.key(2))
    for _ in range(2):
        state, info = never.step(state, data)
        assert not bool(info.accepted) and not bool(info.rolled_back)
    (lineage,) = state.proposer_states[0].lineages[0]
    np.testing.assert_allclose(_moved(lineage, params, 0), -0.08, rtol=1e-4)
    # Rolls back to the (unchanged) stable model every step: the current model "changes"
    # each time, so the lineage restarts from it instead of going on to -0.08.
    back = build(_AlwaysRollBack())
    state = back.init(model, jax.random.key(2))
    for _ in range(2):
        state, info = back.step(state, data)
        assert bool(info.rolled_back)
    (lineage,) = state.proposer_states[0].lineages[0]
    np.testing.assert_allclose(_moved(lineage, params, 0), 0.0, atol=1e-6)


def test_assess_and_decide_draw_distinct_examples(builtin_plugins):
    # decide_size equal to the stream's length: every example exactly once, so the logged
    # accuracy of the current model is its accuracy on the whole stream (a draw with
    # replacement would be a bootstrap resample and differ).
    data, _ = ev3core.toy_problem(jax.random.key(0), n=300)
    engine = smoke_pipeline(plugins=builtin_plugins, assess_size=300, decide_size=300).build()
    model = ev3core.toy_model(jax.random.key(1))
    state = engine.init(model, jax.random.key(2))
    _, info = engine.step(state, data)
    x, y = data.decide
    acc = float(jnp.mean(jnp.argmax(jax.vmap(model)(x), -1) == y))
    assert float(info.decide_mean[0, CURRENT]) == pytest.approx(acc, abs=1e-6)
    assert float(info.assess_mean[0, -2]) == pytest.approx(
        float(jnp.mean(jnp.argmax(jax.vmap(model)(data.assess[0]), -1) == data.assess[1])),
        abs=1e-6,
    )
    # Fewer than the stream: distinct examples, a different subset each step.
    from ev3core._engine.sampling import sample as _sample

    idx = jnp.arange(300)
    for size in (20, 200):  # the sparse (repeat-rejecting) and the dense (top-k) draw
        keys = jax.random.split(jax.random.key(0), 200)
        draws = list(
            np.asarray(jax.jit(jax.vmap(lambda k, size=size: _sample(idx, k, size)))(keys))
        )
        assert all(len(np.unique(d)) == size for d in draws)
        assert len({tuple(d) for d in draws}) == 200  # a different subset each time
        freq = np.bincount(np.concatenate(draws), minlength=300) / 200
        assert abs(freq.mean() - size / 300) < 1e-9 and freq.max() < 3 * size / 300 + 0.05


def test_neg_brier_score_matches_a_hand_computation():
    model = ev3core.toy_model(jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (5, 2))
    y = jnp.array([0, 1, 1, 0, 1])
    scores = np.asarray(ev3core.NegBrierScore()(model, (x, y)))
    for i in range(5):
        p = np.asarray(jax.nn.softmax(model(x[i])), np.float64)
        onehot = np.eye(p.shape[0])[int(y[i])]
        assert scores[i] == pytest.approx(-np.sum((p - onehot) ** 2), abs=1e-6)
    assert np.all(scores <= 0) and np.all(scores >= -2)
    assert ev3core.plugin_manager().get("assessor", "neg_brier") is ev3core.NegBrierScore


# ------------------------------------------------------------------ history and validity
def test_history_ring_buffer_keeps_the_latest_decisions():
    h = ev3core.History.empty(4, 1)
    for i in range(6):
        h = h.record(
            jnp.int32(i),
            jnp.int32(0),
            jnp.int32(i % 3),
            jnp.bool_(True),
            jnp.bool_(i == 2),
            jnp.full((1,), float(i)),
        )
    o = h.ordered()
    assert list(o.step) == [2, 3, 4, 5] and int(h.count) == 6
    assert list(o.score[:, 0]) == [2.0, 3.0, 4.0, 5.0]
    assert int(h.non_significant_streak()) == 3
    assert int(ev3core.History.empty(4, 1).non_significant_streak()) == 0


class _StableScoresHigher(ev3core._engine.placement.AbstractPlacement):
    """One device, but the decide trio's stable slot scores 1e-4 higher on every example:
    the worst case of the rounding differences XLA may give one slot of a batch of models
    against another."""

    inner: ev3core._engine.placement.LocalPlacement

    @property
    def mesh(self):
        return None

    def place(self, components):
        return components

    def place_state(self, state):
        return state

    def constrain_state(self, state):
        return state

    def proposing(self):
        return self.inner.proposing()

    def score_replicated(self, assessors, models, static, batch):
        scores = self.inner.score_replicated(assessors, models, static, batch)
        return scores.at[:, STABLE].add(1e-4)

    def score(self, assessors, candidates, state, batch, chunk):
        return self.inner.score(assessors, candidates, state, batch, chunk)

    def take(self, held, index, like):
        return self.inner.take(held, index, like)


def test_a_stable_model_identical_to_the_current_one_never_rolls_back(tiny_problem):
    """Right after a significant step the stable model *is* the current one. Scored in one
    batch with the winner, its scores may differ from the current model's by rounding; the
    engine scores it as the current model, so such a difference never rolls the model back
    to itself (which would restart every `on_reject="continue"` lineage). A stable model
    that differs from the current one still rolls back when it is reliably better."""
    data, model = tiny_problem
    proposer = ev3core.GradientProposer(
        [ev3core.CrossEntropy()], [optax.sgd(0.0)], steps=1, batch_size=32, on_reject="continue"
    )  # learning rate 0: the winner is the current model, so no candidate is ever better
    engine = ev3core.Pipeline(
        proposers=[proposer], assessors=["accuracy"], assess_size=64, decide_size=64
    ).build()
    engine = eqx.tree_at(
        lambda e: e.placement,
        engine,
        _StableScoresHigher(ev3core._engine.placement.LocalPlacement()),
    )
    state = engine.init(model, jax.random.key(0))
    for _ in range(3):
        assert _leaves_equal(state.current, state.stable)
        state, info = engine.step(state, data)
        assert info.choice == ev3core.Choice.current, info.choice
        assert not bool(info.rolled_back)
    # a stable model that is not the current one, and scores higher: rolled back to
    other = jax.tree.map(lambda x: x + 1.0, state.current)
    state = eqx.tree_at(lambda s: s.current, state, other)
    state, info = engine.step(state, data)
    assert info.choice == ev3core.Choice.stable
    assert bool(info.rolled_back)
