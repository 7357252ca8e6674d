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

Runs in about two minutes on 2 CPU cores (`--quick`: a few seconds, fewer trials).
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
from ev3core import CURRENT, STABLE, WINNER, EV3Scheduler, EV3SchedulerState, History
from ev3core._bounds import advantage, weighted_mean

NOMINAL = 0.95
Z = ev3core.z_for_level(NOMINAL)
P0 = 0.8
DELTA = 0.02
WORSE = -0.01
Q_RANGE = (0.02, 0.3)
N_ASSESS, N_DECIDE = 256, 1024
KS = (1, 4, 16, 64)


# --------------------------------------------------------------------------- simulation
def paired_scores(key, accuracy, q, u):
    """0/1 scores of a model of the given accuracy, sharing the uniforms `u` except on a
    fraction `q` of the examples (re-drawn): exactly Bernoulli(accuracy) per example."""
    k_fresh, k_flip = jax.random.split(key)
    fresh = jax.random.uniform(k_fresh, u.shape)
    v = jnp.where(jax.random.bernoulli(k_flip, q, u.shape), fresh, u)
    return (v < accuracy).astype(jnp.float32)


def candidates(key, deltas, q, u):
    keys = jax.random.split(key, deltas.shape[0])
    return jax.vmap(paired_scores, in_axes=(0, 0, 0, None))(keys, P0 + deltas, q, u)


def mean_utility(v, w):
    return weighted_mean(v[0], w)


KMAX = max(KS)


def split_trial(scheduler, deltas, k, key):
    """One engine decision: select on assess data, decide on independent decide data.

    Candidates beyond `k` (padding up to `KMAX`, so that every K shares one compiled
    program) are marked invalid, as the engine marks non-finite candidates.
    """
    kq, ku_a, kc_a, ku_d, kw_d, ks = jax.random.split(key, 6)
    valid = jnp.arange(KMAX) < k
    q = jax.random.uniform(kq, (KMAX,), minval=Q_RANGE[0], maxval=Q_RANGE[1])
    u_a = jax.random.uniform(ku_a, (N_ASSESS,))
    cur_a = (u_a < P0).astype(jnp.float32)
    scores_a = jnp.concatenate([candidates(kc_a, deltas, q, u_a), cur_a[None], cur_a[None]])[None]
    history = History.empty(4, 1)
    state = EV3SchedulerState(key=ks, priority=None)
    winner = scheduler.select(scores_a, valid, state, history)
    u_d = jax.random.uniform(ku_d, (N_DECIDE,))
    cur_d = (u_d < P0).astype(jnp.float32)
    win_d = paired_scores(kw_d, P0 + deltas[winner], q[winner], u_d)
    scores_d = jnp.stack([win_d, cur_d, cur_d])[None]
    decision, _ = scheduler.decide(scores_d, jnp.array(True), state, history)
    lower, upper = decision.lower, decision.upper
    return {
        "accepted": decision.choice == WINNER,
        "significant": decision.significant,
        "winner_delta": deltas[winner],
        "margin": lower[WINNER] - jnp.maximum(lower[CURRENT], lower[STABLE]),
        "significance_margin": lower[WINNER] - upper[STABLE],
    }


def same_data_trial(bound, deltas, k, key):
    """Select and accept on the same examples: the best lower bound over `k` comparisons."""
    kq, ku, kc, kb = jax.random.split(key, 4)
    q = jax.random.uniform(kq, (KMAX,), minval=Q_RANGE[0], maxval=Q_RANGE[1])
    u = jax.random.uniform(ku, (N_DECIDE,))
    cur = (u < P0).astype(jnp.float32)
    scores = jnp.concatenate([candidates(kc, deltas, q, u), cur[None]])[None]
    mask = jnp.arange(KMAX + 1) < k
    iv = bound.interval(mean_utility, scores, KMAX, jnp.float32(Z), kb, mask)
    _, lower, _ = advantage(iv, KMAX, bound.paired)
    lower = jnp.where(mask[:KMAX], lower[:KMAX], -jnp.inf)
    winner = jnp.argmax(lower)
    return {
        "accepted": lower[winner] > 0,
        "winner_delta": deltas[winner],
        "margin": lower[winner],
    }


SCENARIOS = ("null", "worse", "better")


def scenario_deltas(name: str) -> jax.Array:
    if name == "null":
        return jnp.zeros((KMAX,), jnp.float32)
    if name == "worse":
        return jnp.full((KMAX,), WORSE, jnp.float32)
    return jnp.zeros((KMAX,), jnp.float32).at[0].set(DELTA)


@eqx.filter_jit
def run_configs(trial, component, deltas, ks, keys, batch):
    """`trial(component, deltas[c], ks[c], key)` for every config `c` and every key."""

    def per_config(xs):
        d, k, kk = xs
        return jax.lax.map(lambda key: trial(component, d, k, key), kk, batch_size=batch)

    return jax.lax.map(per_config, (deltas, ks, keys))


def summarise(null, worse, better, margin="margin", accepted="accepted") -> dict[str, float]:
    tau = float(np.quantile(null[margin], NOMINAL))
    good = better["winner_delta"] > 0
    return {
        "false_acceptance_null": float(null[accepted].mean()),
        "false_acceptance_worse": float(worse[accepted].mean()),
        "power": float((better[accepted] & good).mean()),
        "power_at_nominal_fa": float(((better[margin] > tau) & good).mean()),
        "winner_is_better": float(good.mean()),
    }


def safety(key, trials: int, boot_trials: int, resamples: int) -> list[dict[str, Any]]:
    split_rows = [
        ("normal", "none", ev3core.NormalBound()),
        ("paired", "none", ev3core.PairedBound()),
        ("paired", "bonferroni", ev3core.PairedBound(correction="bonferroni")),
        ("bootstrap", "none", ev3core.BootstrapBound(num_resamples=resamples)),
    ]
    same_rows = [
        ("paired", "none", ev3core.PairedBound()),
        ("paired", "bonferroni", ev3core.PairedBound(correction="bonferroni")),
        ("paired", "holm", ev3core.PairedBound(correction="holm")),
        ("paired", "max", ev3core.PairedBound(correction="max", num_resamples=resamples)),
        ("bootstrap", "none", ev3core.BootstrapBound(num_resamples=resamples)),
        ("bootstrap", "max", ev3core.BootstrapBound(num_resamples=resamples, correction="max")),
    ]
    configs = [(s, k) for k in KS for s in SCENARIOS]
    deltas = jnp.stack([scenario_deltas(s) for s, _ in configs])
    ks = jnp.asarray([k for _, k in configs], jnp.int32)
    rows = []
    for protocol, table in (("split", split_rows), ("same-data", same_rows)):
        for name, correction, bound in table:
            resampling = isinstance(bound, ev3core.BootstrapBound) or correction == "max"
            n = boot_trials if resampling else trials
            batch = 10 if resampling else 500
            keys = jax.random.split(key, (len(configs), n))
            if protocol == "split":
                component = EV3Scheduler(assess_alpha=0.5, decide_alpha=Z, bound=bound)
                out = run_configs(split_trial, component, deltas, ks, keys, min(batch, n))
            else:
                out = run_configs(same_data_trial, bound, deltas, ks, keys, min(batch, n))
            out = jax.tree.map(np.asarray, out)
            res = {cfg: jax.tree.map(lambda x, i=i: x[i], out) for i, cfg in enumerate(configs)}
            for k in KS:
                null, worse, better = (res[(s, k)] for s in SCENARIOS)
                row = {"protocol": protocol, "bound": name, "correction": correction, "K": k}
                row.update(summarise(null, worse, better))
                row["trials"] = n
                rows.append(row)
                if protocol == "split" and name == "normal":
                    sig = dict(row, bound="normal (significant rule)")
                    sig.update(summarise(null, worse, better, margin="significance_margin",
                                         accepted="significant"))
                    rows.append(sig)
    order = {(p, b, c): i for i, (p, b, c) in enumerate(
        (r["protocol"], r["bound"], r["correction"]) for r in rows)}
    return sorted(rows, key=lambda r: (r["K"], order[(r["protocol"], r["bound"],
                                                      r["correction"])]))


# --------------------------------------------------------------------------- multi-objective
def emulate(scheduler, make_candidates, start, key, steps: int, n_assess: int, n_decide: int,
            k: int):
    """The engine's loop on simulated objectives: true values of current and stable models.

    `make_candidates(key, true_current) -> true values [K, M]`; each objective's per-example
    scores are paired accuracies (independent uniforms per objective).
    """
    num = start.shape[0]
    state = scheduler.init(num)
    state = EV3SchedulerState(key=jax.random.fold_in(key, 1), priority=state.priority)
    history = History.empty(8, num)

    def scores(key, trues, qs, n):  # trues [models, M] -> [M, models, n]
        k_u, k_m = jax.random.split(key)
        u = jax.random.uniform(k_u, (num, n))
        keys = jax.random.split(k_m, trues.shape[0] * num).reshape(trues.shape[0], num)
        per = jax.vmap(jax.vmap(paired_scores, in_axes=(0, 0, 0, 0)), in_axes=(0, 0, 0, None))
        return jnp.moveaxis(per(keys, trues, qs, u), 0, 1)

    def step(carry, key):
        cur, stab, sstate, hist = carry
        k_c, k_q, k_a, k_d = jax.random.split(key, 4)
        cands = make_candidates(k_c, cur)
        qs = jax.random.uniform(k_q, (k, num), minval=Q_RANGE[0], maxval=Q_RANGE[1])
        zero_q = jnp.zeros((2, num))
        s_a = scores(k_a, jnp.concatenate([cands, cur[None], stab[None]]),
                     jnp.concatenate([qs, zero_q]), n_assess)
        winner = scheduler.select(s_a, jnp.ones((k,), bool), sstate, hist)
        trio = jnp.stack([cands[winner], cur, stab])
        s_d = scores(k_d, trio, jnp.stack([qs[winner], zero_q[0], zero_q[1]]), n_decide)
        decision, sstate = scheduler.decide(s_d, jnp.array(True), sstate, hist)
        new_cur = trio[decision.choice]
        new_stab = jnp.where(decision.update_stable, trio[WINNER], stab)
        observed = jnp.mean(s_d, axis=-1)  # [M, 3]
        hist = hist.record(hist.count, winner, decision.choice, decision.choice == WINNER,
                           decision.significant, observed[:, decision.choice])
        log = {
            "priorities": decision.priorities,
            "accepted": decision.choice == WINNER,
            "true": new_cur,
            "true_change": new_cur - cur,
            "observed_change": observed[:, decision.choice] - observed[:, CURRENT],
        }
        return (new_cur, new_stab, sstate, hist), log

    _, logs = jax.lax.scan(step, (start, start, state, history), jax.random.split(key, steps))
    return logs


@eqx.filter_jit
def run_emulations(scheduler, make_candidates, start, keys, steps, n_assess, n_decide, k):
    """`emulate` for every key (repeats), in one compiled program per scheduler structure."""
    return jax.vmap(
        lambda kk: emulate(scheduler, make_candidates, start, kk, steps, n_assess, n_decide, k)
    )(keys)


A_MAX, B_MAX = 0.9, 0.95


def saturating_candidates(key, cur):
    """A has little headroom (saturates early); B has a lot and improves slowly."""
    ka, kb = jax.random.split(key)
    k = 8
    da = (A_MAX - cur[0]) * jax.random.uniform(ka, (k,), minval=-0.5, maxval=0.8)
    db = (B_MAX - cur[1]) * jax.random.uniform(kb, (k,), minval=-0.15, maxval=0.15)
    return cur + jnp.stack([da, db], axis=-1)


def trading_candidates(key, cur):
    """Improving B tends to cost A: da = -0.6 db + noise."""
    kb, ka = jax.random.split(key)
    k = 8
    db = jax.random.uniform(kb, (k,), minval=-0.01, maxval=0.04)
    da = -0.6 * db + jax.random.uniform(ka, (k,), minval=-0.008, maxval=0.008)
    return jnp.clip(cur + jnp.stack([da, db], axis=-1), 0.0, 1.0)


def priorities_benchmark(key, repeats: int, steps: int) -> dict[str, Any]:
    schedulers = {
        "fixed A (weighted_sum 0.9/0.1)": ev3core.WeightedSum([0.9, 0.1]),
        "weighted_sum 0.5/0.5": ev3core.WeightedSum([0.5, 0.5]),
        "chebyshev 0.5/0.5": ev3core.WeightedChebyshev([0.5, 0.5]),
        "lexicographic A>B tol 0.005": ev3core.Lexicographic((0, 1), (0.005, 0.0)),
        "stall (patience 5)": ev3core.StallPriority(patience=5),
        "ucb": ev3core.UCBPriority(),
        "exp3": ev3core.EXP3Priority(),
    }
    start = jnp.array([0.84, 0.55], jnp.float32)
    quarter = steps // 4
    out = {}
    for name, priority in schedulers.items():
        sched = EV3Scheduler(assess_alpha=0.5, decide_alpha=Z, priority=priority)
        logs = run_emulations(sched, saturating_candidates, start,
                              jax.random.split(key, repeats), steps, N_ASSESS, N_DECIDE, 8)
        logs = jax.tree.map(np.asarray, logs)
        pb = logs["priorities"][..., 1]  # [repeats, steps]
        out[name] = {
            "priority_B_by_quarter": [float(pb[:, i * quarter:(i + 1) * quarter].mean())
                                      for i in range(4)],
            "A_saturated_at_step": int(np.argmax(logs["true"][..., 0].mean(0) >= A_MAX - 0.005)),
            "final_true_A": float(logs["true"][:, -1, 0].mean()),
            "final_true_B": float(logs["true"][:, -1, 1].mean()),
            "accepted_per_step": float(logs["accepted"].mean()),
            "priority_B_trajectory": [round(float(x), 3) for x in pb.mean(0)],
        }
    return {"start": [float(x) for x in start], "A_max": A_MAX, "B_max": B_MAX,
            "steps": steps, "repeats": repeats, "schedulers": out}


def constraint_benchmark(key, repeats: int, steps: int) -> dict[str, Any]:
    max_drop = 0.005
    start = jnp.array([0.85, 0.6], jnp.float32)
    out = {}
    for label, alpha in (("decide_alpha=4 (EV3 default)", 4.0), ("decide_alpha=1.645 (95%)", Z)):
        for constrained in (True, False):
            sched = EV3Scheduler(
                assess_alpha=0.5, decide_alpha=alpha, priority=ev3core.WeightedSum([0.0, 1.0]),
                objectives=[ev3core.Objective("A"), ev3core.Objective("B")],
                constraints=[ev3core.Constraint("A", max_drop=max_drop)] if constrained else (),
            )
            logs = run_emulations(sched, trading_candidates, start,
                                  jax.random.split(key, repeats), steps, N_ASSESS, 4096, 8)
            logs = jax.tree.map(np.asarray, logs)
            acc = logs["accepted"]
            true_drop = -logs["true_change"][..., 0]
            seen_drop = -logs["observed_change"][..., 0]
            out[f"{label}, {'with' if constrained else 'without'} constraint"] = {
                "accepted_steps": int(acc.sum()),
                "accepted_true_violations": int((acc & (true_drop > max_drop)).sum()),
                "accepted_decide_set_violations": int((acc & (seen_drop > max_drop)).sum()),
                "worst_true_drop_accepted": float(np.where(acc, true_drop, -np.inf).max()),
                "final_true_A": float(logs["true"][:, -1, 0].mean()),
                "final_true_B": float(logs["true"][:, -1, 1].mean()),
            }
    return {"max_drop": max_drop, "start": [float(x) for x in start], "steps": steps,
            "repeats": repeats, "n_decide": 4096, "runs": out}


# --------------------------------------------------------------------------- report
def print_safety(rows):
    print(f"\n== Safety of one decision: nominal one-sided level {NOMINAL:.0%} (alpha = {Z:.3f}),"
          f" false acceptance target <= {1 - NOMINAL:.0%} ==")
    print("   protocol  | bound                     | correction |  K | FA null | FA worse | "
          "power | power@FA | trials")
    for r in rows:
        print(f"  {r['protocol']:<10} | {r['bound']:<25} | {r['correction']:<10} | {r['K']:>2} | "
              f"{r['false_acceptance_null']:7.3f} | {r['false_acceptance_worse']:8.3f} | "
              f"{r['power']:5.3f} | {r['power_at_nominal_fa']:8.3f} | {r['trials']}")


def print_priorities(res):
    print(f"\n== Priorities: A saturates early (start {res['start']}, A max {res['A_max']}), "
          f"B keeps improving; {res['repeats']} repeats x {res['steps']} steps ==")
    print("  scheduler                     | priority on B by quarter  | A sat. | final A | "
          "final B")
    for name, r in res["schedulers"].items():
        q = " ".join(f"{x:.2f}" for x in r["priority_B_by_quarter"])
        print(f"  {name:<29} | {q:<25} | {r['A_saturated_at_step']:>6} | {r['final_true_A']:.4f}"
              f"  | {r['final_true_B']:.4f}")


def print_constraint(res):
    print(f"\n== Constraint: lose at most {res['max_drop']} of A while optimising B "
          f"({res['repeats']} repeats x {res['steps']} steps) ==")
    print("  run                                           | accepted | true viol. | "
          "decide-set viol. | worst true drop | final A | final B")
    for name, r in res["runs"].items():
        print(f"  {name:<45} | {r['accepted_steps']:>8} | {r['accepted_true_violations']:>10} | "
              f"{r['accepted_decide_set_violations']:>16} | {r['worst_true_drop_accepted']:15.4f} |"
              f" {r['final_true_A']:.4f}  | {r['final_true_B']:.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--boot-trials", type=int, default=1000)
    parser.add_argument("--resamples", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="few trials, for a smoke check")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.boot_trials, args.resamples = 200, 50, 100
        args.repeats, args.steps = 8, 40
    t0 = time.perf_counter()
    key = jax.random.key(args.seed)
    k1, k2, k3 = jax.random.split(key, 3)
    rows = safety(k1, args.trials, args.boot_trials, args.resamples)
    print_safety(rows)
    prio = priorities_benchmark(k2, args.repeats, args.steps)
    print_priorities(prio)
    cons = constraint_benchmark(k3, args.repeats, args.steps)
    print_constraint(cons)
    seconds = time.perf_counter() - t0
    print(f"\n{seconds:.1f} s on {jax.devices()[0].platform} ({platform.processor() or 'cpu'})")
    result = {
        "config": {
            "nominal_level": NOMINAL, "alpha": Z, "p0": P0, "delta": DELTA, "worse": WORSE,
            "q_range": Q_RANGE, "n_assess": N_ASSESS, "n_decide": N_DECIDE, "Ks": KS,
            "trials": args.trials, "boot_trials": args.boot_trials,
            "resamples": args.resamples, "seed": args.seed,
        },
        "safety": rows,
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
