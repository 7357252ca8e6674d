"""Safe acceptance, proved by simulation: false acceptance, power, priorities, constraints.

Every decision below is made by ev3core's own components (`EV3Scheduler.select` /
`decide`, `AbstractBound.interval`) on simulated per-example scores whose ground truth is
known, thousands of times in one `vmap`.

Simulated scores: accuracies (0/1 per example). The current model has accuracy `P0`; a
candidate with true improvement `delta` has accuracy `P0 + delta`. Scores are *paired*, as in
the engine: every model is scored on the same examples, and a candidate agrees with the
current model on an example unless that example is "re-drawn" for it (probability `q`, drawn
per candidate from `Q_RANGE`), so candidates differ in how many predictions they change.

Part 1, safety of one decision (K candidates, the current and the stable model equal):

- scenarios: `null` (every candidate's true improvement is 0), `worse` (all -0.01),
  `better` (one candidate +`DELTA`, the others 0);
- protocol `split` (the engine): select the winner on `N_ASSESS` assess examples, decide on
  `N_DECIDE` independent decide examples with `EV3Scheduler.decide`;
- protocol `same-data`: select and decide on the same `N_DECIDE` examples (accept the best
  candidate when its lower bound over the K comparisons is above zero), where only a
  correction for K keeps the level;
- false acceptance = P(accept) in `null` and `worse`; power = P(accept the better candidate)
  in `better`; `power@FA` = power with the acceptance threshold moved so that the empirical
  false acceptance in `null` is exactly the nominal level (a comparison at equal false
  acceptance).

Part 2, priorities: objective A saturates early, objective B keeps improving; the engine
loop is emulated (true values of current and stable models tracked) and each priority
scheduler's logged priorities are averaged over repeats.

Part 3, a constraint "do not lose more than 0.5 points of A" while optimising B, with
candidates that trade A for B: accepted steps that truly violate it, with and without it.

    python benchmarks/safety.py --json safety.json [--trials 2000] [--quick]

Runs in about three minutes of CPU time on 2 cores (`--quick`: under a minute, few trials).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import ev3core
from ev3core import (
    CURRENT,
    STABLE,
    WINNER,
    Choice,
    EV3Scheduler,
    EV3SchedulerState,
    History,
    choice_index,
)
from ev3core._adapt.bounds import _standardised, advantage, weighted_mean

NOMINAL = 0.95
Z = ev3core.z_for_level(NOMINAL)
P0 = 0.8
DELTA = 0.02
WORSE = -0.01
Q_RANGE = (0.02, 0.3)
N_ASSESS, N_DECIDE = 256, 1024
KS = (1, 4, 16, 64)


# --------------------------------------------------------------------------- simulation
KMAX = max(KS)
SCENARIOS = ("null", "worse", "better")
_LATTICE = 1 << 16  # scores are drawn on a 16-bit lattice, so "no better" is exact


def _threshold(p):
    return jnp.round(jnp.clip(p, 0.0, 1.0) * _LATTICE).astype(jnp.uint32)


def lattice_scores(words, u, accuracy, q):
    """0/1 scores of a model of the given accuracy, paired with the current model.

    `u` (16-bit) decides the current model's scores (`u < P0`); the model re-draws an example
    when the high half of its word is below `q` (then its low half is the fresh draw), and
    otherwise shares `u`. Each score is exactly Bernoulli(accuracy) on the lattice.
    """
    redraw = (words >> 16) < _threshold(q)
    v = jnp.where(redraw, words & 0xFFFF, u)
    return (v < _threshold(accuracy)).astype(jnp.float32)


def paired_scores(key, accuracy, q, u):
    """`lattice_scores` with fresh words (used by the multi-objective emulation)."""
    return lattice_scores(jax.random.bits(key, u.shape, jnp.uint32), u, accuracy, q)


def mean_utility(v, w):
    return weighted_mean(v[0], w)


def draw(key):
    """One trial's random words, shared by every scenario, K and bound (common random
    numbers: the bounds are compared on the same data)."""
    kq, ka, kua, kd, kud, ks = jax.random.split(key, 6)
    return {
        "q": jax.random.uniform(kq, (KMAX,), minval=Q_RANGE[0], maxval=Q_RANGE[1]),
        "assess": jax.random.bits(ka, (KMAX, N_ASSESS), jnp.uint32),
        "u_assess": jax.random.bits(kua, (N_ASSESS,), jnp.uint32) & 0xFFFF,
        "decide": jax.random.bits(kd, (KMAX, N_DECIDE), jnp.uint32),
        "u_decide": jax.random.bits(kud, (N_DECIDE,), jnp.uint32) & 0xFFFF,
        "key": ks,
    }


def split_decision(scheduler, data, cand_a, cur_a, cand_d, cur_d, deltas, k):
    """The engine's decision: select on assess data, decide on independent decide data.

    Candidates beyond `k` (padding up to `KMAX`) are marked invalid, as the engine marks
    non-finite candidates, so every K shares one compiled program.
    """
    valid = jnp.arange(KMAX) < k
    scores_a = jnp.concatenate([cand_a, cur_a[None], cur_a[None]])[None]
    history = History.empty(4, 1)
    state = EV3SchedulerState(key=data["key"], priority=None)
    winner = scheduler.select(scores_a, valid, state, history)
    scores_d = jnp.stack([cand_d[winner], cur_d, cur_d])[None]
    decision, _ = scheduler.decide(scores_d, jnp.array(True), state, history)
    lower, upper = decision.lower, decision.upper
    # For the unpaired bound: Welch's test of the difference, from the marginal intervals.
    centre, half = (upper + lower) / 2, (upper - lower) / 2
    welch = centre[WINNER] - centre[CURRENT] - jnp.hypot(half[WINNER], half[CURRENT])
    return {
        "accepted": decision.choice == Choice.winner,
        "significant": decision.significant,
        "winner_delta": deltas[winner],
        "margin": lower[WINNER] - jnp.maximum(lower[CURRENT], lower[STABLE]),
        "significance_margin": lower[WINNER] - upper[STABLE],
        "welch_margin": welch,
        "welch_accepted": welch > 0,
    }


def same_data_decision(bound, data, cand_d, cur_d, deltas, k):
    """Select and accept on the same examples: the best lower bound over `k` comparisons."""
    scores = jnp.concatenate([cand_d, cur_d[None]])[None]
    mask = jnp.arange(KMAX + 1) < k
    iv = bound.interval(mean_utility, scores, KMAX, jnp.float32(Z), data["key"], mask)
    _, lower, _ = advantage(iv, KMAX, bound.paired)
    lower = jnp.where(mask[:KMAX], lower[:KMAX], -jnp.inf)
    winner = jnp.argmax(lower)
    return {"accepted": lower[winner] > 0, "winner_delta": deltas[winner], "margin": lower[winner]}


def trial(schedulers, bounds, deltas, ks, key):
    """Every (scenario, K) config and every scheduler / bound on one trial's data."""
    data = draw(key)
    cur_a = (data["u_assess"] < _threshold(P0)).astype(jnp.float32)
    cur_d = (data["u_decide"] < _threshold(P0)).astype(jnp.float32)
    scores = jax.vmap(lattice_scores, in_axes=(0, None, 0, 0))

    def per_config(d, k):
        cand_a = scores(data["assess"], data["u_assess"], P0 + d, data["q"])
        cand_d = scores(data["decide"], data["u_decide"], P0 + d, data["q"])
        out = [split_decision(s, data, cand_a, cur_a, cand_d, cur_d, d, k) for s in schedulers]
        out += [same_data_decision(b, data, cand_d, cur_d, d, k) for b in bounds]
        return out

    return jax.vmap(per_config)(deltas, ks)


@eqx.filter_jit
def run_trials(schedulers, bounds, deltas, ks, keys, batch):
    return jax.lax.map(lambda kk: trial(schedulers, bounds, deltas, ks, kk), keys, batch_size=batch)


def summarise(null, worse, better, margin="margin", accepted="accepted") -> dict[str, float]:
    tau = float(np.quantile(null[margin], NOMINAL))
    good = better["winner_delta"] > 0
    fa = float(null[accepted].mean())
    return {
        "false_acceptance_null": fa,
        "false_acceptance_null_se": float(np.sqrt(fa * (1 - fa) / null[accepted].size)),
        "false_acceptance_worse": float(worse[accepted].mean()),
        "power": float((better[accepted] & good).mean()),
        "power_at_nominal_fa": float(((better[margin] > tau) & good).mean()),
        "winner_is_better": float(good.mean()),
    }


def safety(key, trials: int, boot_trials: int, resamples: int) -> list[dict[str, Any]]:
    def sched(bound):
        return EV3Scheduler(assess_alpha=0.5, decide_alpha=Z, bound=bound)

    paired, normal = ev3core.PairedBound, ev3core.NormalBound
    boot = lambda **kw: ev3core.BootstrapBound(num_resamples=resamples, **kw)  # noqa: E731
    groups = [  # (trials, [(protocol, bound name, correction, component)])
        (
            trials,
            [
                ("split", "normal", "none", sched(normal())),
                ("split", "paired", "none", sched(paired())),
                ("split", "paired", "bonferroni", sched(paired(correction="bonferroni"))),
                ("same-data", "paired", "none", paired()),
                ("same-data", "paired", "bonferroni", paired(correction="bonferroni")),
                ("same-data", "paired", "holm", paired(correction="holm")),
            ],
        ),
        (
            boot_trials,
            [
                ("split", "bootstrap", "none", sched(boot())),
                ("same-data", "paired", "max", paired(correction="max", num_resamples=resamples)),
                ("same-data", "bootstrap", "none", boot()),
                ("same-data", "bootstrap", "max", boot(correction="max")),
            ],
        ),
    ]
    configs = [(s, k) for k in KS for s in SCENARIOS]
    deltas = jnp.stack(
        [
            jnp.zeros((KMAX,))
            if s == "null"
            else jnp.full((KMAX,), WORSE)
            if s == "worse"
            else jnp.zeros((KMAX,)).at[0].set(DELTA)
            for s, _ in configs
        ]
    ).astype(jnp.float32)
    ks = jnp.asarray([k for _, k in configs], jnp.int32)
    rows = []
    for g, (n, members) in enumerate(groups):
        schedulers = tuple(m[3] for m in members if m[0] == "split")
        bounds = tuple(m[3] for m in members if m[0] == "same-data")
        keys = jax.random.split(jax.random.fold_in(key, g), n)
        batch = min(n, 200 if g == 0 else 5)
        out = jax.tree.map(np.asarray, run_trials(schedulers, bounds, deltas, ks, keys, batch))
        for (protocol, name, correction, _), res in zip(members, out):
            for k in KS:
                null, worse, better = (
                    jax.tree.map(lambda x, i=i: x[:, i], res)
                    for i in (configs.index((s, k)) for s in SCENARIOS)
                )
                row = {"protocol": protocol, "bound": name, "correction": correction, "K": k}
                row.update(summarise(null, worse, better))
                row["trials"] = n
                rows.append(row)
                if name == "normal":  # the unpaired bound's two valid tests of "better"
                    for label, margin, accepted in (
                        ("normal (significant rule)", "significance_margin", "significant"),
                        ("normal (Welch difference)", "welch_margin", "welch_accepted"),
                    ):
                        extra = dict(row, bound=label)
                        extra.update(summarise(null, worse, better, margin, accepted))
                        rows.append(extra)
    rank = {"split": 0, "same-data": 1}
    return sorted(rows, key=lambda r: (r["K"], rank[r["protocol"]]))


# --------------------------------------------------------------------------- equal size
#: Null family of the equal-size comparison: how often a candidate's prediction differs from
#: the current model's (`q`; 1.0 = independent predictions) and the current accuracy `p0`.
SIZE_Q = (0.02, 0.1, 0.3, 1.0)
SIZE_P0 = (0.6, 0.8, 0.95)
SIZE_Z = np.round(np.arange(0.0, 6.0001, 0.005), 3)
SIZE_TESTS = (
    "paired",
    "unpaired (Welch difference)",
    "unpaired (reference, significant)",
    "unpaired (reference, accept)",
)


def unit_z_statistics(key, p0, q, delta):
    """One decision's statistics, from ev3core's own bounds at `z = 1` (one standard error).

    Returns `(t_paired, t_welch, t_significant, m0 - m1, se0 - se1)`: a test with alpha `z`
    accepts when its `t > z`; the reference's accept rule (`lower_W > lower_C`) accepts when
    `m0 - z * se0 > m1 - z * se1`, returned as its two parts.
    """
    kw, ku, kb = jax.random.split(key, 3)
    u = jax.random.bits(ku, (N_DECIDE,), jnp.uint32) & 0xFFFF
    words = jax.random.bits(kw, (N_DECIDE,), jnp.uint32)
    cand = lattice_scores(words, u, p0 + delta, q)
    cur = (u < _threshold(p0)).astype(jnp.float32)
    scores = jnp.stack([cand, cur])[None]
    one = jnp.float32(1.0)
    paired = ev3core.PairedBound().interval(mean_utility, scores, 1, one, kb)
    t_paired = _standardised(paired.point[0], paired.point[0] - paired.lower[0])
    marg = ev3core.NormalBound().interval(mean_utility, scores, 1, one, kb)
    m, se = marg.point, marg.point - marg.lower
    diff = m[0] - m[1]
    return t_paired, diff / jnp.hypot(se[0], se[1]), diff / (se[0] + se[1]), diff, se[0] - se[1]


@eqx.filter_jit
def size_trials(keys, p0s, qs, deltas, zs):
    """Acceptance rate of every test at every alpha in `zs`, per configuration."""

    def per_key(key):
        def per_config(p0, q, d):
            t_p, t_w, t_s, diff, dse = unit_z_statistics(key, p0, q, d)
            accept_ref = diff[None] > zs * dse[None]
            return jnp.stack([t_p > zs, t_w > zs, t_s > zs, accept_ref])  # [test, z]

        return jax.vmap(per_config)(p0s, qs, deltas)

    counts = jax.lax.map(per_key, keys, batch_size=100)  # [trial, config, test, z]
    return jnp.mean(counts.astype(jnp.float32), axis=0)


def equal_size(key, trials: int) -> dict[str, Any]:
    """Power of each test at the alpha that gives it a size of 5% over the null family.

    A test's *size* is its largest false-acceptance rate over every null configuration it
    may meet (here every `q` in `SIZE_Q`, independent predictions included, and every `p0`).
    For each test the smallest alpha on a grid whose size is <= 5% is taken, and the tests'
    powers (`delta = DELTA`) are compared at that alpha: a comparison at the same
    false-acceptance rate that does not assume the user knows how correlated the models are.
    """
    nulls = [(p0, q, 0.0) for p0 in SIZE_P0 for q in SIZE_Q]
    betters = [(p0, q, DELTA) for p0 in SIZE_P0 for q in SIZE_Q]
    configs = nulls + betters
    arr = lambda i: jnp.asarray([c[i] for c in configs], jnp.float32)  # noqa: E731
    rates = np.asarray(
        size_trials(jax.random.split(key, trials), arr(0), arr(1), arr(2), jnp.asarray(SIZE_Z))
    )  # [config, test, z]
    null_rates, better_rates = rates[: len(nulls)], rates[len(nulls) :]
    out = {}
    for t, name in enumerate(SIZE_TESTS):
        size = null_rates[:, t, :].max(axis=0)  # [z]
        ok = np.nonzero(size <= 1 - NOMINAL)[0]
        if ok.size == 0:
            out[name] = {
                "alpha_at_size_5pct": None,
                "smallest_size": float(size.min()),
                "note": "no alpha on the grid reaches a 5% size",
            }
            continue
        i = int(ok[0])
        at = lambda cfgs, r, i=i, t=t: {  # noqa: E731
            f"p0={c[0]},q={c[1]}": round(float(r[j, t, i]), 4) for j, c in enumerate(cfgs)
        }
        power = better_rates[:, t, i]
        realistic = [j for j, c in enumerate(betters) if c[1] < 1.0]
        out[name] = {
            "alpha_at_size_5pct": float(SIZE_Z[i]),
            "size": float(size[i]),
            "false_acceptance": at(nulls, null_rates),
            "power": at(betters, better_rates),
            "mean_power_correlated": float(power[realistic].mean()),
            "mean_power_independent": float(
                power[[j for j, c in enumerate(betters) if c[1] == 1.0]].mean()
            ),
            "false_acceptance_at_nominal_alpha": float(
                null_rates[:, t, int(np.argmin(np.abs(SIZE_Z - Z)))].max()
            ),
        }
    return {
        "trials": trials,
        "n_decide": N_DECIDE,
        "delta": DELTA,
        "q": SIZE_Q,
        "p0": SIZE_P0,
        "tests": out,
    }


# --------------------------------------------------------------------------- multi-objective
def emulate(scheduler, make_candidates, start, key, steps, n_decide, q_range):
    """The engine's loop on simulated objectives, tracking the true values of the current and
    stable models. `make_candidates(key, true_current) -> true values [K, M]`; each
    objective's per-example scores are paired accuracies (independent words per objective);
    assessment uses `N_ASSESS` examples, decisions `n_decide`."""
    num = start.shape[0]
    state = scheduler.init(num, jax.random.fold_in(key, 1))
    history = History.empty(8, num)
    per_model = jax.vmap(jax.vmap(paired_scores), in_axes=(0, 0, 0, None))

    def scores(key, trues, qs, n):  # trues, qs: [models, M] -> scores [M, models, n]
        k_u, k_m = jax.random.split(key)
        u = jax.random.bits(k_u, (num, n), jnp.uint32) & 0xFFFF
        keys = jax.random.split(k_m, trues.shape[:2])
        return jnp.moveaxis(per_model(keys, trues, qs, u), 0, 1)

    def step(carry, key):
        cur, stab, sstate, hist = carry
        k_c, k_q, k_a, k_d = jax.random.split(key, 4)
        cands = make_candidates(k_c, cur)
        k = cands.shape[0]
        qs = jax.random.uniform(k_q, (k, num), minval=q_range[0], maxval=q_range[1])
        incumbents_q = jnp.zeros((2, num))  # current and stable share the examples' draws
        s_a = scores(
            k_a,
            jnp.concatenate([cands, cur[None], stab[None]]),
            jnp.concatenate([qs, incumbents_q]),
            N_ASSESS,
        )
        winner = scheduler.select(s_a, jnp.ones((k,), bool), sstate, hist)
        trio = jnp.stack([cands[winner], cur, stab])
        s_d = scores(k_d, trio, jnp.concatenate([qs[winner][None], incumbents_q]), n_decide)
        decision, sstate = scheduler.decide(s_d, jnp.array(True), sstate, hist)
        position = choice_index(decision.choice)
        new_cur = trio[position]
        new_stab = jnp.where(decision.update_stable, trio[WINNER], stab)
        observed = jnp.mean(s_d, axis=-1)  # [M, 3]
        hist = hist.record(
            hist.count,
            winner,
            position,
            decision.choice == Choice.winner,
            decision.significant,
            observed[:, position],
        )
        log = {
            "priorities": decision.priorities,
            "accepted": decision.choice == Choice.winner,
            "true": new_cur,
            "winner_true_change": cands[winner] - cur,
            "observed_change": observed[:, WINNER] - observed[:, CURRENT],
        }
        return (new_cur, new_stab, sstate, hist), log

    _, logs = jax.lax.scan(step, (start, start, state, history), jax.random.split(key, steps))
    return logs


@eqx.filter_jit
def run_emulations(scheduler, make_candidates, start, keys, steps, n_decide, q_range):
    """`emulate` for every key (repeats), in one compiled program per scheduler structure."""
    return jax.vmap(
        lambda kk: emulate(scheduler, make_candidates, start, kk, steps, n_decide, q_range)
    )(keys)


A_MAX = 0.9


def saturating_candidates(key, cur):
    """8 candidates: A improves by a share of its small headroom (it saturates early); B
    improves by small steady amounts (it keeps improving)."""
    ka, kb = jax.random.split(key)
    da = (A_MAX - cur[0]) * jax.random.uniform(ka, (8,), minval=-0.3, maxval=0.7)
    db = jax.random.uniform(kb, (8,), minval=-0.01, maxval=0.015)
    return jnp.clip(cur + jnp.stack([da, db], axis=-1), 0.0, 1.0)


def trading_candidates(key, cur):
    """8 candidates: half are honest (B +0..0.015, A within 0.3 points), half trade A for B
    (B +0.02..0.04, A -1..-3 points)."""
    kc, kb1, kb2, ka1, ka2 = jax.random.split(key, 5)
    trade = jax.random.bernoulli(kc, 0.5, (8,))
    u = lambda k, lo, hi: jax.random.uniform(k, (8,), minval=lo, maxval=hi)  # noqa: E731
    db = jnp.where(trade, u(kb1, 0.02, 0.04), u(kb2, 0.0, 0.015))
    da = jnp.where(trade, u(ka1, -0.03, -0.01), u(ka2, -0.003, 0.002))
    return jnp.clip(cur + jnp.stack([da, db], axis=-1), 0.0, 1.0)


def priorities_benchmark(key, repeats: int, steps: int) -> dict[str, Any]:
    schedulers = {
        "fixed on A (weighted_sum 0.9/0.1)": ev3core.WeightedSum([0.9, 0.1]),
        "weighted_sum 0.5/0.5": ev3core.WeightedSum([0.5, 0.5]),
        "chebyshev 0.5/0.5": ev3core.WeightedChebyshev([0.5, 0.5]),
        "lexicographic A>B, tol 0.005": ev3core.Lexicographic((0, 1), (0.005, 0.0)),
        "stall (patience 5)": ev3core.StallPriority(patience=5),
        "ucb": ev3core.UCBPriority(),
        "exp3": ev3core.EXP3Priority(),
    }
    start = jnp.array([0.8, 0.5], jnp.float32)
    out = {}
    for name, priority in schedulers.items():
        sched = EV3Scheduler(assess_alpha=0.5, decide_alpha=Z, priority=priority)
        logs = run_emulations(
            sched,
            saturating_candidates,
            start,
            jax.random.split(key, repeats),
            steps,
            N_DECIDE,
            Q_RANGE,
        )
        logs = jax.tree.map(np.asarray, logs)
        pb = logs["priorities"][..., 1].mean(0)  # [steps]
        mean_a = logs["true"][..., 0].mean(0)
        out[name] = {
            "priority_B_by_quarter": [float(x.mean()) for x in np.array_split(pb, 4)],
            "A_saturated_at_step": int(np.argmax(mean_a >= A_MAX - 0.005)),
            "final_true_A": float(mean_a[-1]),
            "final_true_B": float(logs["true"][:, -1, 1].mean()),
            "accepted_per_step": float(logs["accepted"].mean()),
            "priority_B_trajectory": [round(float(x), 3) for x in pb],
        }
    return {
        "start": [float(x) for x in start],
        "A_max": A_MAX,
        "steps": steps,
        "repeats": repeats,
        "schedulers": out,
    }


def constraint_benchmark(key, repeats: int, steps: int) -> dict[str, Any]:
    max_drop, n_decide, q_range = 0.005, 4096, (0.01, 0.05)
    start = jnp.array([0.85, 0.6], jnp.float32)
    out = {}
    for label, alpha in (("decide_alpha=4 (EV3 default)", 4.0), ("decide_alpha=1.645 (95%)", Z)):
        for constrained in (True, False):
            sched = EV3Scheduler(
                assess_alpha=0.5,
                decide_alpha=alpha,
                priority=ev3core.WeightedSum([0.0, 1.0]),
                objectives=[ev3core.Objective("A"), ev3core.Objective("B")],
                constraints=[ev3core.Constraint("A", max_drop=max_drop)] if constrained else (),
            )
            logs = run_emulations(
                sched,
                trading_candidates,
                start,
                jax.random.split(key, repeats),
                steps,
                n_decide,
                q_range,
            )
            logs = jax.tree.map(np.asarray, logs)
            acc = logs["accepted"]
            violating = -logs["winner_true_change"][..., 0] > max_drop
            seen_drop = -logs["observed_change"][..., 0]
            out[f"{label}, {'with' if constrained else 'without'} constraint"] = {
                "accepted_steps": int(acc.sum()),
                "accepted_true_violations": int((acc & violating).sum()),
                "violating_winners": int(violating.sum()),
                "accepted_decide_set_violations": int((acc & (seen_drop > max_drop)).sum()),
                "final_true_A": float(logs["true"][:, -1, 0].mean()),
                "final_true_B": float(logs["true"][:, -1, 1].mean()),
            }
    return {
        "max_drop": max_drop,
        "start": [float(x) for x in start],
        "steps": steps,
        "repeats": repeats,
        "n_decide": n_decide,
        "q_range": q_range,
        "runs": out,
    }


# --------------------------------------------------------------------------- report
def print_safety(rows):
    print(
        f"\n== Safety of one decision: nominal one-sided level {NOMINAL:.0%} (alpha = {Z:.3f}),"
        f" false acceptance target <= {1 - NOMINAL:.0%} =="
    )
    print(
        "  FA null +- its Monte Carlo standard error; power@FA: power with the threshold moved "
        "so that the empirical FA null is exactly 5% (an oracle calibration)"
    )
    print(
        "  protocol   | bound                     | correction |  K | FA null       | FA worse | "
        "power | power@FA | trials"
    )
    for r in rows:
        fa = f"{r['false_acceptance_null']:.3f}+-{r['false_acceptance_null_se']:.3f}"
        print(
            f"  {r['protocol']:<10} | {r['bound']:<25} | {r['correction']:<10} | {r['K']:>2} | "
            f"{fa:<13} | {r['false_acceptance_worse']:8.3f} | "
            f"{r['power']:5.3f} | {r['power_at_nominal_fa']:8.3f} | {r['trials']}"
        )


def print_equal_size(res):
    print(
        f"\n== Power at the same size (largest false acceptance over the null family: q in "
        f"{res['q']}, p0 in {res['p0']}) = 5%, K=1, n={res['n_decide']}, true gain "
        f"{res['delta']}, {res['trials']} trials per configuration =="
    )
    print(
        "  test                              | alpha for size 5% | size  | size at alpha=1.645 | "
        "power (q<1) | power (q=1)"
    )
    for name, r in res["tests"].items():
        if r["alpha_at_size_5pct"] is None:
            print(
                f"  {name:<33} | {'none':>17} | smallest size on the grid "
                f"{r['smallest_size']:.3f}: it cannot be made safe by its alpha"
            )
            continue
        print(
            f"  {name:<33} | {r['alpha_at_size_5pct']:17.3f} | {r['size']:.3f} | "
            f"{r['false_acceptance_at_nominal_alpha']:19.3f} | {r['mean_power_correlated']:11.3f}"
            f" | {r['mean_power_independent']:.3f}"
        )


def print_priorities(res):
    print(
        f"\n== Priorities: A saturates early (start {res['start']}, A max {res['A_max']}), "
        f"B keeps improving; {res['repeats']} repeats x {res['steps']} steps =="
    )
    print(
        "  scheduler                          | priority on B by quarter | A sat. | final A | "
        "final B"
    )
    for name, r in res["schedulers"].items():
        q = " ".join(f"{x:.2f}" for x in r["priority_B_by_quarter"])
        print(
            f"  {name:<34} | {q:<24} | {r['A_saturated_at_step']:>6} | "
            f"{r['final_true_A']:.4f}  | {r['final_true_B']:.4f}"
        )


def print_constraint(res):
    print(
        f"\n== Constraint: lose at most {res['max_drop']} of A while optimising B "
        f"({res['repeats']} repeats x {res['steps']} steps) =="
    )
    print(
        "  run                                              | accepted | violating winners | "
        "accepted violations: true, decide set | final A | final B"
    )
    for name, r in res["runs"].items():
        print(
            f"  {name:<48} | {r['accepted_steps']:>8} | {r['violating_winners']:>17} | "
            f"{r['accepted_true_violations']:>25}, {r['accepted_decide_set_violations']:>10} | "
            f"{r['final_true_A']:.4f}  | {r['final_true_B']:.4f}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--boot-trials", type=int, default=400)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--size-trials", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="few trials, for a smoke check")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.boot_trials, args.resamples = 200, 20, 100
        args.repeats, args.steps, args.size_trials = 8, 40, 400
    t0 = time.perf_counter()
    key = jax.random.key(args.seed)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    rows = safety(k1, args.trials, args.boot_trials, args.resamples)
    print_safety(rows)
    size = equal_size(k4, args.size_trials)
    print_equal_size(size)
    prio = priorities_benchmark(k2, args.repeats, args.steps)
    print_priorities(prio)
    cons = constraint_benchmark(k3, args.repeats, args.steps)
    print_constraint(cons)
    seconds = time.perf_counter() - t0
    print(f"\n{seconds:.1f} s on {jax.devices()[0].platform} ({platform.processor() or 'cpu'})")
    result = {
        "config": {
            "nominal_level": NOMINAL,
            "alpha": Z,
            "p0": P0,
            "delta": DELTA,
            "worse": WORSE,
            "q_range": Q_RANGE,
            "n_assess": N_ASSESS,
            "n_decide": N_DECIDE,
            "Ks": KS,
            "trials": args.trials,
            "boot_trials": args.boot_trials,
            "resamples": args.resamples,
            "seed": args.seed,
        },
        "safety": rows,
        "equal_size": size,
        "priorities": prio,
        "constraint": cons,
        "seconds": seconds,
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
