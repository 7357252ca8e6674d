"""Priority schedulers: each one's priority trajectory on a scripted history."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ev3core
from ev3core import (
    EV3Scheduler,
    EXP3Priority,
    Feedback,
    History,
    Lexicographic,
    StallPriority,
    UCBPriority,
    WeightedChebyshev,
    WeightedSum,
)
from ev3core._adapt.priorities import lexicographic_rank
from ev3core.errors import ConfigurationError

HISTORY = History.empty(4, 2)
KEY = jax.random.key(0)


def feedback(accepted, gain_lower, priorities=(1.0, 0.0)):
    g = jnp.asarray(gain_lower, jnp.float32)
    return Feedback(
        accepted=jnp.asarray(accepted),
        significant=jnp.asarray(False),
        gain=g,
        gain_lower=g,
        gain_upper=g,
        priorities=jnp.asarray(priorities, jnp.float32),
    )


def trajectory(priority, script, key=KEY):
    """Priorities before each scripted step; `script` gives (accepted, gain_lower)."""
    state = priority.init(2)
    out = []
    for i, (accepted, gains) in enumerate(script):
        w = priority.priorities(state, HISTORY, jax.random.fold_in(key, i))
        out.append(np.asarray(w))
        state = priority.update(state, feedback(accepted, gains, w), HISTORY)
    return np.stack(out)


def test_fixed_weights():
    ws = WeightedSum([3.0, 1.0])
    np.testing.assert_allclose(trajectory(ws, [(True, [1, 0])] * 3), [[0.75, 0.25]] * 3)
    ch = WeightedChebyshev([0.5, 0.5])
    np.testing.assert_allclose(trajectory(ch, [(False, [0, 0])] * 2), [[0.5, 0.5]] * 2)
    # -max_o w_o (ideal_o - value_o): shortfalls 0.05 and 0.2
    values = jnp.array([0.9, 0.6])
    assert float(ch.utility(values, ch.weights)) == pytest.approx(-0.2)
    # an objective with zero weight does not take part
    assert float(ch.utility(values, jnp.array([1.0, 0.0]))) == pytest.approx(-0.1)
    assert float(ws.utility(values, ws.weights)) == pytest.approx(0.75 * 0.9 + 0.25 * 0.6)
    with pytest.raises(ConfigurationError, match="non-negative"):
        WeightedSum([1.0, -1.0])
    with pytest.raises(ConfigurationError, match="objective"):
        WeightedSum([1.0, 1.0, 1.0]).init(2)


def test_lexicographic_rank_and_priorities():
    lex = Lexicographic(order=(1, 0), tolerances=(0.005, 0.0))
    lex.init(2)
    np.testing.assert_allclose(trajectory(lex, [(True, [1, 1])] * 2), [[0.0, 1.0]] * 2)
    lower = jnp.array([[0.01, -0.002, -0.01], [0.0, 0.02, 0.03]])
    rank, at = lexicographic_rank(lower, jnp.array([0.005, 0.0]))
    # model 0 decided at position 0; model 1 within tolerance there, decided at 1; model 2
    # is worse than the tolerance at position 0, so nothing decides it
    assert list(np.asarray(rank)) == [0, 1, 2]
    np.testing.assert_allclose(at, [0.01, 0.02, -0.01])
    with pytest.raises(ConfigurationError, match="order"):
        Lexicographic(order=(0, 0)).init(2)
    with pytest.raises(ConfigurationError, match="tolerances"):
        Lexicographic(order=(0, 1), tolerances=(0.1,)).init(2)


def test_stall_priority_rotates_after_patience_stalled_steps():
    stall = StallPriority(patience=3, floor=0.1)
    script = [
        (True, [0.01, 0.0]),  # focus 0 improves: streak reset
        (False, [0.0, 0.0]),  # 1
        (True, [-0.001, 0.02]),  # accepted, but the focus did not improve significantly: 2
        (False, [0.0, 0.0]),  # 3 -> priority moves to objective 1
        (True, [0.0, 0.01]),  # focus 1 improves
        (False, [0.0, 0.0]),
        (False, [0.0, 0.0]),
        (False, [0.0, 0.0]),  # 3 stalled steps -> back to objective 0
        (False, [0.0, 0.0]),
    ]
    a, b = [0.95, 0.05], [0.05, 0.95]
    np.testing.assert_allclose(trajectory(stall, script), [a, a, a, a, b, b, b, b, a], atol=1e-6)


def test_ucb_priority_follows_the_rewarding_objective():
    ucb = UCBPriority(exploration=0.5, discount=1.0, floor=0.0)
    # objective 0 improves only at the first step; objective 1 improves from step 4 on
    script = [(True, [0.01, 0.0])] + [(True, [0.0, 0.0])] * 3 + [(True, [0.0, 0.01])] * 4
    arms = trajectory(ucb, script).argmax(-1)
    # step 0, 1: unplayed arms in order; 2: mean 1 + bonus 0.741 vs 0 + 0.741; 3: 0.5 + 0.589
    # vs 0.833; 4: 0.333 + 0.518 vs 0.897 -> arm 1, which then keeps being rewarded
    assert list(arms) == [0, 1, 0, 0, 1, 1, 1, 1]
    # With discounting, old rewards fade, so an objective that saturates loses priority
    # sooner: objective 0 improves for 6 steps, then only objective 1 does.
    script = [(True, [0.01, 0.0])] * 6 + [(True, [0.0, 0.01])] * 12

    def takeover(discount):
        arms = trajectory(UCBPriority(exploration=0.5, discount=discount, floor=0.0), script)
        late = arms.argmax(-1)[6:]
        return int(np.argmax(late == 1)) if (late == 1).any() else len(late)

    assert takeover(0.7) < takeover(1.0)


def test_exp3_update_and_draws():
    exp3 = EXP3Priority(gamma=0.2, floor=0.0)
    state = exp3.init(2)
    np.testing.assert_allclose(exp3.probabilities(state), [0.5, 0.5])
    # arm 0 rewarded: log-weight += gamma * 1 / (p_arm * M) = 0.2
    state = exp3.update(state, feedback(True, [0.01, 0.0], (1.0, 0.0)), HISTORY)
    np.testing.assert_allclose(state.log_weights, [0.2, 0.0], rtol=1e-6)
    soft = np.exp([0.2, 0.0]) / np.exp([0.2, 0.0]).sum()
    np.testing.assert_allclose(exp3.probabilities(state), 0.8 * soft + 0.1, rtol=1e-6)
    # no reward for an arm whose objective did not improve
    same = exp3.update(state, feedback(True, [0.0, -0.01], (0.0, 1.0)), HISTORY)
    np.testing.assert_allclose(same.log_weights, state.log_weights)
    # the same key draws the same arm (select and decide agree); draws follow p
    keys = jax.random.split(jax.random.key(3), 4000)
    draws = jax.vmap(lambda k: exp3.priorities(state, HISTORY, k))(keys)
    assert np.array_equal(draws, jax.vmap(lambda k: exp3.priorities(state, HISTORY, k))(keys))
    assert float(draws[:, 0].mean()) == pytest.approx(0.8 * soft[0] + 0.1, abs=0.025)


# ------------------------------------------------------------------ through the scheduler
N = 8
BASE = jnp.linspace(0.0, 1.0, N)


def scores(shift_a, shift_b):
    """(winner, current, stable) with the winner shifted on every example: the paired
    difference has no variance, so its lower bound is the shift itself."""
    cur = jnp.stack([BASE, BASE])
    win = cur + jnp.array([[shift_a], [shift_b]])
    return jnp.stack([win, cur, cur], axis=1)


def run_script(priority, shifts):
    sched = EV3Scheduler(assess_alpha=0.5, decide_alpha=1.645, priority=priority)
    state = sched.init(2, jax.random.key(0))
    history = History.empty(8, 2)
    decide = eqx.filter_jit(sched.decide)
    logged = []
    for shift in shifts:
        decision, state = decide(scores(*shift), jnp.array(True), state, history)
        history = history.record(
            history.count,
            jnp.int32(0),
            ev3core.choice_index(decision.choice),
            decision.choice == ev3core.Choice.winner,
            decision.significant,
            jnp.zeros(2),
        )
        logged.append((np.asarray(decision.priorities), int(ev3core.choice_index(decision.choice))))
    return logged


def test_stall_priority_through_the_scheduler():
    # A improves twice, then stalls (winners no better); B then improves.
    shifts = [(0.1, 0.0)] * 2 + [(0.0, 0.0)] * 3 + [(0.0, 0.1)] * 3
    logged = run_script(StallPriority(patience=3, floor=0.1), shifts)
    focus = [int(p.argmax()) for p, _ in logged]
    choices = [c for _, c in logged]
    assert focus == [0, 0, 0, 0, 0, 1, 1, 1]
    assert choices == [0, 0, 1, 1, 1, 0, 0, 0]  # WINNER accepted, then kept, then accepted
    for p, _ in logged:
        assert p.sum() == pytest.approx(1.0)


def test_ucb_priority_through_the_scheduler():
    shifts = [(0.1, 0.0)] + [(0.0, 0.0)] * 3 + [(0.0, 0.1)] * 4
    logged = run_script(UCBPriority(exploration=0.5, discount=1.0, floor=0.1), shifts)
    assert [int(p.argmax()) for p, _ in logged] == [0, 1, 0, 0, 1, 1, 1, 1]
