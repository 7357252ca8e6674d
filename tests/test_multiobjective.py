"""The EV3 rule on each bound, objectives, constraints and priorities inside the engine."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ev3core
from ev3core import (
    CURRENT,
    STABLE,
    WINNER,
    Constraint,
    EV3Scheduler,
    History,
    NormalBound,
    Objective,
)
from ev3core._adapt.priorities import BanditState
from ev3core._adapt.schedulers import mean_and_stderr
from ev3core._host.smoke import smoke_pipeline
from ev3core.errors import ConfigurationError, UnknownComponentError

KEY = jax.random.key(0)

N = 16
BASE = jnp.linspace(0.0, 1.0, N)
YES = jnp.array(True)


def trio(*shifts, objectives=1):
    """Decide scores `[objective, 3, N]`: winner, current, stable = BASE + a constant shift
    per model (and per objective if `shifts` are tuples). Constant shifts make the paired
    differences noiseless, so a paired lower bound is the shift itself."""
    rows = []
    for o in range(objectives):
        rows.append(jnp.stack([BASE + (s[o] if isinstance(s, tuple) else s) for s in shifts]))
    return jnp.stack(rows)


def decide(sched, scores, winner_valid=YES, history=None):
    history = History.empty(4, scores.shape[0]) if history is None else history
    state = sched.init(scores.shape[0], KEY)
    decision, _ = eqx.filter_jit(sched.decide)(scores, winner_valid, state, history)
    return decision


# ------------------------------------------------------------------ the rule on each bound
def test_normal_bound_is_exactly_the_reference_rule():
    sched = EV3Scheduler(assess_alpha=0.5, decide_alpha=4.0, bound=NormalBound())
    history = History.empty(4, 2)
    state = sched.init(2, KEY)
    for seed in range(20):
        k1, k2 = jax.random.split(jax.random.key(seed))
        scores_a = jax.random.bernoulli(k1, 0.7, (2, 8, 64)).astype(jnp.float32)
        scores_d = jax.random.bernoulli(k2, 0.7, (2, 3, 512)).astype(jnp.float32)
        scores_d = scores_d.at[0, WINNER].set(jnp.where(seed % 3 == 0, 1.0, scores_d[0, 0]))
        valid = jnp.arange(6) != seed % 6
        # the reference implementation, written out
        mean, se = mean_and_stderr(scores_a[0, :6])
        lcb = jnp.where(valid, mean - 0.5 * se, -jnp.inf)
        assert int(sched.select(scores_a, valid, state, history)) == int(jnp.argmax(lcb))
        mean, se = mean_and_stderr(scores_d[0])
        lower, upper = mean - 4 * se, mean + 4 * se
        order = jnp.array([CURRENT, WINNER, STABLE])
        choice = order[jnp.argmax(lower[order])]
        decision, _ = sched.decide(scores_d, YES, state, history)
        assert int(ev3core.choice_index(decision.choice)) == int(choice)
        assert bool(decision.significant) == bool(lower[WINNER] > upper[STABLE])
        np.testing.assert_allclose(decision.lower, lower, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(decision.upper, upper, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(decision.priorities, [1.0, 0.0])


@pytest.mark.parametrize("bound", ["paired", "bootstrap"])
def test_paired_rule(bound, builtin_plugins):
    # a component built outside a pipeline takes instances (names resolve at build time)
    sched = EV3Scheduler(decide_alpha=1.645, bound=builtin_plugins.make("bound", bound))
    d = decide(sched, trio(0.1, 0.0, 0.0))  # winner better than both incumbents
    assert int(ev3core.choice_index(d.choice)) == WINNER and bool(d.significant)
    np.testing.assert_allclose(d.lower, [0.1, 0.0, 0.0], atol=1e-6)  # relative to current
    d = decide(sched, trio(-0.1, 0.0, 0.0))  # winner worse: keep
    assert int(ev3core.choice_index(d.choice)) == CURRENT and not bool(d.significant)
    d = decide(sched, trio(0.1, 0.0, 0.2))  # the stable model is best: roll back
    assert int(ev3core.choice_index(d.choice)) == STABLE and not bool(d.significant)
    d = decide(sched, trio(0.1, 0.0, -0.1))  # accept; beats the stable model too
    assert int(ev3core.choice_index(d.choice)) == WINNER and bool(d.significant)
    d = decide(sched, trio(0.1, 0.2, -0.1))  # beats stable but not current: new stable only
    assert int(ev3core.choice_index(d.choice)) == CURRENT and bool(d.significant)
    d = decide(sched, trio(0.0, 0.0, 0.0))  # a tie never moves the model
    assert int(ev3core.choice_index(d.choice)) == CURRENT and not bool(d.significant)
    d = decide(sched, trio(0.5, 0.0, 0.0), winner_valid=jnp.array(False))
    assert int(ev3core.choice_index(d.choice)) == CURRENT and not bool(d.significant)


def test_noise_needs_enough_evidence():
    """A paired bound on noisy differences accepts only when the mean difference clears
    alpha standard errors of the differences."""
    key = jax.random.key(0)
    cur = jax.random.bernoulli(key, 0.8, (1000,)).astype(jnp.float32)
    flip = jax.random.bernoulli(jax.random.key(1), 0.1, (1000,))
    win = jnp.where(flip, 1.0, cur)  # right on ~2% more examples
    scores = jnp.stack([win, cur, cur])[None]
    d = win - cur
    t = float(d.mean() / (d.std(ddof=1) / np.sqrt(1000)))
    for alpha, accept in ((t - 0.5, True), (t + 0.5, False)):
        dec = decide(EV3Scheduler(decide_alpha=alpha), scores)
        assert (int(ev3core.choice_index(dec.choice)) == WINNER) is accept


# ------------------------------------------------------------------ objectives and constraints
def test_direction_min_negates():
    scores = trio(-0.1, 0.0, 0.0)  # the winner's scores are lower
    assert int(ev3core.choice_index(decide(EV3Scheduler(), scores).choice)) == CURRENT
    minimise = EV3Scheduler(objectives=[Objective("size", direction="min")])
    assert int(ev3core.choice_index(decide(minimise, scores).choice)) == WINNER


def test_constraint_blocks_a_step_that_loses_too_much():
    # objective 1 improves by 0.1, objective 0 loses 0.01 (exactly: noiseless differences)
    scores = trio((-0.01, 0.1), (0.0, 0.0), (0.0, 0.0), objectives=2)
    names = [Objective("accuracy"), Objective("calibration")]

    def sched(max_drop):
        return EV3Scheduler(
            decide_alpha=1.645,
            priority=ev3core.WeightedSum([0.0, 1.0]),
            objectives=names,
            constraints=[Constraint("accuracy", max_drop=max_drop)],
        )

    blocked = decide(sched(0.005), scores)
    assert int(ev3core.choice_index(blocked.choice)) == CURRENT and not bool(blocked.significant)
    allowed = decide(sched(0.02), scores)
    assert int(ev3core.choice_index(allowed.choice)) == WINNER and bool(allowed.significant)
    # no constraint: the step is taken
    free = EV3Scheduler(decide_alpha=1.645, priority=ev3core.WeightedSum([0.0, 1.0]))
    assert int(ev3core.choice_index(decide(free, scores).choice)) == WINNER
    # the stable update checks the constraint against the stable model
    vs_stable = trio((0.0, 0.1), (0.0, 0.0), (0.02, 0.0), objectives=2)
    d = decide(sched(0.005), vs_stable)
    assert int(ev3core.choice_index(d.choice)) == WINNER and not bool(d.significant)


def test_constraint_names_and_errors():
    with pytest.raises(ConfigurationError, match="named"):
        EV3Scheduler(constraints=[Constraint("accuracy", max_drop=0.005)]).init(2, KEY)
    with pytest.raises(ConfigurationError, match="index"):
        EV3Scheduler(constraints=[Constraint(3, max_drop=0.005)]).init(2, KEY)
    with pytest.raises(ConfigurationError, match="max_drop"):
        Constraint("accuracy", max_drop=-0.1)
    with pytest.raises(ConfigurationError, match="one Objective per assessor"):
        EV3Scheduler(objectives=["a"]).init(2, KEY)
    with pytest.raises(ConfigurationError, match="direction"):
        Objective("a", direction="up")


def test_components_by_name_are_resolved_when_a_pipeline_is_built(builtin_plugins):
    p = builtin_plugins
    sched = EV3Scheduler(bound="bootstrap", priority="stall")
    # the scheduler keeps the names; it never looks up a registry itself
    assert sched.bound == ev3core.ComponentName("bound", "bootstrap")
    with pytest.raises(ConfigurationError, match="Pipeline"):
        sched.init(2, KEY)
    with pytest.raises(ConfigurationError, match="Pipeline"):
        ev3core.Engine(
            [ev3core.GradientProposer([ev3core.CrossEntropy()], [optax.sgd(0.1)])],
            [ev3core.Accuracy(), ev3core.NegCrossEntropy()],
            sched,
        )
    engine = smoke_pipeline(
        plugins=p, scheduler=sched, assessors=["accuracy", "neg_cross_entropy"]
    ).build()
    assert isinstance(engine.scheduler.bound, ev3core.BootstrapBound)
    assert isinstance(engine.scheduler.priority, ev3core.StallPriority)
    with pytest.raises(UnknownComponentError, match="paired"):
        smoke_pipeline(plugins=p, scheduler=EV3Scheduler(bound="pairedd")).build()
    with pytest.raises(ConfigurationError, match="needs arguments"):
        smoke_pipeline(plugins=p, scheduler=EV3Scheduler(priority="weighted_sum")).build()


def test_lexicographic_decisions_log_the_deciding_objective():
    sched = EV3Scheduler(
        decide_alpha=1.645, priority=ev3core.Lexicographic((0, 1), tolerances=(0.005, 0.0))
    )

    def run(a, b):
        return decide(sched, trio((a, b), (0.0, 0.0), (0.0, 0.0), objectives=2))

    d = run(0.05, -0.2)  # better on the first objective: decided there
    assert int(ev3core.choice_index(d.choice)) == WINNER
    np.testing.assert_allclose(d.priorities, [1.0, 0.0])
    d = run(-0.003, 0.1)  # within tolerance on the first, better on the second
    assert int(ev3core.choice_index(d.choice)) == WINNER
    np.testing.assert_allclose(d.priorities, [0.0, 1.0])
    np.testing.assert_allclose(d.lower, [0.1, 0.0, 0.0], atol=1e-6)
    d = run(-0.01, 0.1)  # worse than the tolerance on the first: refused
    assert int(ev3core.choice_index(d.choice)) == CURRENT


def test_batch_level_objective_with_the_bootstrap():
    f1 = ev3core.F1Score()
    key = jax.random.key(0)
    y = jax.random.bernoulli(key, 0.4, (400,))

    def cells(p_right, k):
        pred = jnp.where(jax.random.bernoulli(k, p_right, (400,)), y, ~y)
        return jnp.where(pred, jnp.where(y, 1, 2), jnp.where(y, 3, 0)).astype(jnp.float32)

    good, bad = cells(0.95, jax.random.key(1)), cells(0.7, jax.random.key(2))
    sched = EV3Scheduler(
        decide_alpha=1.645,
        bound=ev3core.BootstrapBound(num_resamples=500),
        objectives=[Objective("f1", metric=f1)],
    )
    d = decide(sched, jnp.stack([good, bad, bad])[None])
    assert int(ev3core.choice_index(d.choice)) == WINNER and bool(d.significant)
    # the logged advantage is in F1 units
    expect = f1.metric(good, jnp.ones(400)) - f1.metric(bad, jnp.ones(400))
    assert float(d.upper[WINNER]) > float(expect) > float(d.lower[WINNER]) > 0
    assert (
        int(ev3core.choice_index(decide(sched, jnp.stack([bad, good, good])[None]).choice))
        == CURRENT
    )


# ------------------------------------------------------------------ in the engine
def test_engine_with_priorities_and_a_constraint(builtin_plugins):
    data, _ = ev3core.toy_problem(jax.random.key(0), n=4096)
    p = builtin_plugins
    sched = EV3Scheduler(
        assess_alpha=0.5,
        decide_alpha=1.645,
        priority=ev3core.UCBPriority(),
        objectives=[Objective("accuracy"), Objective("neg_cross_entropy")],
        constraints=[Constraint("accuracy", max_drop=0.005)],
    )
    engine = smoke_pipeline(plugins=p, scheduler=sched, decide_size=1024).build()
    state = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    assert isinstance(state.scheduler_state.priority, BanditState)
    state, infos = ev3core.run(engine, state, data, 6, plugins=p)
    np.testing.assert_allclose(infos.priorities.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(infos.priorities.max(-1), 0.95, rtol=1e-6)  # 1 - floor + floor/2
    assert infos.accepted.any()
    for i in np.flatnonzero(infos.accepted):  # the constraint held on the decide set
        assert infos.decide_mean[i, 0, WINNER] - infos.decide_mean[i, 0, CURRENT] >= -0.005
    # a bandit's counts advanced once per step
    assert float(state.scheduler_state.priority.counts.sum()) > 0
    # priorities and alphas are array leaves: changing them does not recompile
    counted = eqx.filter_jit(
        eqx.debug.assert_max_traces(lambda e, s, d: e.step_pure(s, d), max_traces=1)
    )
    e = engine
    for a in (1.0, 2.0):
        e = eqx.tree_at(lambda e: e.scheduler.decide_alpha, e, jnp.float32(a))
        e = eqx.tree_at(lambda e: e.scheduler.priority.exploration, e, jnp.float32(a))
        state, _ = counted(e, state, data)


def test_selection_prefers_candidates_that_keep_the_constraints():
    sched = EV3Scheduler(
        assess_alpha=0.5,
        priority=ev3core.WeightedSum([0.0, 1.0]),
        constraints=[Constraint(0, max_drop=0.005)],
    )
    cur = jnp.stack([BASE, BASE])
    bigger = cur + jnp.array([[-0.05], [0.2]])  # best on objective 1, breaks the constraint
    smaller = cur + jnp.array([[0.0], [0.1]])
    scores = jnp.stack([bigger, smaller, cur, cur], axis=1)
    state, history = sched.init(2, KEY), History.empty(4, 2)
    assert int(sched.select(scores, jnp.array([True, True]), state, history)) == 1
    free = EV3Scheduler(assess_alpha=0.5, priority=ev3core.WeightedSum([0.0, 1.0]))
    assert int(free.select(scores, jnp.array([True, True]), free.init(2, KEY), history)) == 0
    # when no candidate keeps them, the best one is still the winner (decide will refuse it)
    scores = jnp.stack([bigger, bigger, cur, cur], axis=1)
    assert int(sched.select(scores, jnp.array([False, True]), state, history)) == 1


def test_engine_names_objectives_and_logs_batch_level_metrics(builtin_plugins):
    """Built into an engine, constraints may name objectives without `objectives=`, and the
    logged value of a batch-level objective is the metric itself (not a mean of encodings)."""
    from ev3core._engine.sampling import sample as _sample

    data, _ = ev3core.toy_problem(jax.random.key(0), n=4096)
    p = builtin_plugins
    f1 = ev3core.F1Score()
    sched = EV3Scheduler(decide_alpha=1.645, constraints=[Constraint("accuracy", max_drop=0.005)])
    with pytest.raises(ConfigurationError, match="named"):
        sched.init(2, KEY)  # unbound, the names are unknown
    engine = smoke_pipeline(
        plugins=p, scheduler=sched, assessors=["accuracy", f1], decide_size=1024
    ).build()
    objectives = engine.scheduler.objectives
    assert [o.name for o in objectives] == ["accuracy", "f1"]
    assert objectives[0].metric is None and objectives[1].metric == f1
    state = engine.init(ev3core.toy_model(jax.random.key(1)), jax.random.key(2))
    before = state
    state, info = engine.step(state, data)
    # The decide batch the step drew, replayed: the logged F1 of the current model is F1.
    k_decide = jax.random.split(before.key, 4)[3]
    x, y = _sample(data.decide, k_decide, engine.decide_size)
    model = before.model
    cells = f1(model, (x, y))
    expect_f1 = float(f1.metric(cells, jnp.ones_like(cells)))
    np.testing.assert_allclose(float(info.decide_mean[1, CURRENT]), expect_f1, rtol=1e-6)
    assert abs(float(jnp.mean(cells)) - expect_f1) > 0.05  # the mean of encodings differs
    acc = jnp.mean(jnp.argmax(jax.vmap(model)(x), -1) == y)
    np.testing.assert_allclose(float(info.decide_mean[0, CURRENT]), float(acc), rtol=1e-6)
