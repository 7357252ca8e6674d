"""Smoke benchmark: ev3core vs. a hand-written single-`jit` JAX iteration of the same workload.

Workload (issue #2): 2-D linearly separable data, MLP 2-8-2, 6 candidates (cross-entropy at
temperatures {0.5, 1, 1.5} x {SGD 0.1, SGD 0.01 momentum 0.95}), trajectories of 100 steps of
batch 32, assess on 128 examples (alpha 0.5), decide on 2048 examples (alpha 4).

Both versions make the same computation: same sampling (with replacement), same decision
rule, accuracy as the one objective. The smoke pipeline of `ev3 run --smoke` also scores a
second objective (`NegCrossEntropy`); it is timed too, for reference. Run:

    python benchmarks/smoke.py --json smoke.json [--iters 30] [--repeats 3]

Prints the median seconds per iteration (after warm-up) of each, their ratio, compile times
(median of `--compile-repeats` compilations, each after `jax.clear_caches()`; and split
into tracing, lowering and XLA's compile for the step and the hand-written jit), and the
final test accuracy of the ev3core run; writes the same to `--json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import ev3core
from ev3core._engine.engine import _jit_step  # the compiled program behind `Engine.step`
from ev3core._engine.sampling import distinct_indices  # the engine's draw of distinct examples
from ev3core._host.smoke import TEMPERATURES, smoke_optimizers, smoke_pipeline

L, B, N_ASSESS, N_DECIDE, A_ASSESS, A_DECIDE = 100, 32, 128, 2048, 0.5, 4.0


def handwritten(model, data):
    """The same EV3 iteration written directly in JAX, one `jax.jit`, no ev3core (apart from
    the engine's draw of distinct assess and decide examples, so that both sample alike)."""
    params, static = eqx.partition(model, eqx.is_array)
    opts = smoke_optimizers()
    temps = jnp.asarray(TEMPERATURES, jnp.float32)
    nt = len(TEMPERATURES)
    xp, yp = data.propose
    xa, ya = data.assess
    xd, yd = data.decide

    def stack(tree, n):
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)

    def loss(p, x, y, t):
        logits = jax.vmap(eqx.combine(p, static))(x) * t
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    def acc(p, x, y):
        return (jnp.argmax(jax.vmap(eqx.combine(p, static))(x), -1) == y).astype(jnp.float32)

    def lcb(s, alpha):
        m = s.mean(-1)
        se = s.std(-1, ddof=1) / jnp.sqrt(jnp.float32(s.shape[-1]))
        return m - alpha * se, m + alpha * se

    def init():
        return (jax.random.key(2), params, params, tuple(stack(o.init(params), nt) for o in opts))

    @jax.jit
    def iteration(carry):
        key, cur, stab, ostates = carry
        key, kp, ka, kd = jax.random.split(key, 4)
        idx = jax.random.randint(kp, (L, len(opts) * nt, B), 0, xp.shape[0])

        def body(c, idx_t):
            out = []
            for j, (opt, (p, o)) in enumerate(zip(opts, c)):
                ix = idx_t[j * nt : (j + 1) * nt]
                g = jax.vmap(jax.grad(loss))(p, xp[ix], yp[ix], temps)
                u, o = jax.vmap(opt.update)(g, o, p)
                out.append((optax.apply_updates(p, u), o))
            return tuple(out), None

        c0 = tuple((stack(cur, nt), o) for o in ostates)
        c, _ = jax.lax.scan(body, c0, idx)
        cands = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[p for p, _ in c])
        allp = jax.tree.map(
            lambda a, b, s: jnp.concatenate([a, b[None], s[None]]), cands, cur, stab
        )
        ia = distinct_indices(ka, xa.shape[0], N_ASSESS)
        sa = jax.vmap(acc, (0, None, None))(allp, xa[ia], ya[ia])
        k = len(opts) * nt
        lo, _ = lcb(sa[:k], A_ASSESS)
        valid = jnp.all(
            jnp.stack(
                [jnp.all(jnp.isfinite(x.reshape(k, -1)), -1) for x in jax.tree.leaves(cands)]
            ),
            0,
        )
        w = jnp.argmax(jnp.where(valid, lo, -jnp.inf))
        win = jax.tree.map(lambda x: x[w], cands)
        trio = jax.tree.map(lambda a, b, s: jnp.stack([a, b, s]), win, cur, stab)
        idd = distinct_indices(kd, xd.shape[0], N_DECIDE)
        sd = jax.vmap(acc, (0, None, None))(trio, xd[idd], yd[idd])
        lo, hi = lcb(sd, A_DECIDE)
        lo = lo.at[0].set(jnp.where(valid[w], lo[0], -jnp.inf))
        order = jnp.array([1, 0, 2])
        choice = order[jnp.argmax(lo[order])]
        new_cur = jax.tree.map(lambda x: x[choice], trio)
        new_stab = jax.tree.map(lambda a, s: jnp.where(lo[0] > hi[2], a, s), win, stab)
        return key, new_cur, new_stab, tuple(o for _, o in c)

    return init, iteration


def timed(fn, iters):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, times, out


def compile_seconds(make_step, repeats):
    """Median over `repeats` of the first call's time less a later call's, each after
    `jax.clear_caches()` (trace + lower + compile + one iteration, less one iteration)."""
    out = []
    for _ in range(repeats):
        jax.clear_caches()
        step = make_step()
        t0 = time.perf_counter()
        jax.block_until_ready(step())
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(step())
        out.append(first - (time.perf_counter() - t0))
    return statistics.median(out)


def stage_seconds(jitted, args, repeats):
    """Median seconds of `trace`, `lower` and XLA `compile` of `jitted(*args)`, each
    repetition after `jax.clear_caches()`."""
    out = []
    for _ in range(repeats):
        jax.clear_caches()
        t0 = time.perf_counter()
        traced = jitted.trace(*args)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        lowered.compile()
        out.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    return {
        stage: statistics.median(x[i] for x in out)
        for i, stage in enumerate(("trace", "lower", "compile"))
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="alternate the versions this many times; medians over all",
    )
    ap.add_argument("--compile-repeats", type=int, default=3, help="compilations timed per version")
    ap.add_argument("--json")
    args = ap.parse_args()

    data, (xt, yt) = ev3core.toy_problem(jax.random.key(0))
    model = ev3core.toy_model(jax.random.key(1))
    plugins = ev3core.load_plugins(autoload=False)
    # The hand-written iteration scores accuracy alone; so does `engine`, which therefore
    # makes the same computation. The smoke pipeline proper (`ev3 run --smoke`) also scores
    # a second objective (`NegCrossEntropy`): `engine2`, timed for reference.
    engine = smoke_pipeline(plugins=plugins, assessors=[ev3core.Accuracy()]).build()
    engine2 = smoke_pipeline(plugins=plugins).build()
    h_init, h_iter = handwritten(model, data)

    def stepper(eng, scan=False):
        box = {"s": eng.init(model, jax.random.key(2))}

        def step():
            if scan:
                box["s"], _ = eng.scan(box["s"], data, 10)
            else:
                box["s"], _ = eng.step(box["s"], data)
            return box["s"].current

        return step, box

    def hw_stepper():
        box = {"c": h_init()}

        def step():
            box["c"] = h_iter(box["c"])
            return box["c"][1]

        return step, box

    versions = {
        "ev3core_step": lambda: stepper(engine),
        "handwritten": hw_stepper,
        "ev3core_scan10": lambda: stepper(engine, scan=True),
        "ev3core_step_two_objectives": lambda: stepper(engine2),
    }
    compile_s = {
        name: compile_seconds(lambda make=make: make()[0], args.compile_repeats)
        for name, make in versions.items()
    }
    # the same, stage by stage: Python tracing, lowering to StableHLO, XLA's compiler
    stages = {
        "ev3core_step": stage_seconds(
            _jit_step, (*engine._split(), engine.init(model, jax.random.key(2)), data),
            args.compile_repeats,
        ),
        "handwritten": stage_seconds(h_iter, (h_init(),), args.compile_repeats),
    }  # fmt: skip
    jax.clear_caches()
    steps = {name: make() for name, make in versions.items()}
    times: dict[str, list[float]] = {name: [] for name in versions}
    for r in range(args.repeats):
        for name, (step, _) in steps.items():
            n = max(1, args.iters // 10) if name == "ev3core_scan10" else args.iters
            _, t, _ = timed(step, n)
            times[name] += [x / 10 for x in t] if name == "ev3core_scan10" else t
        if r == 0:
            final_acc = float(
                ev3core.Accuracy()(steps["ev3core_step"][1]["s"].model, (xt, yt)).mean()
            )

    med = {name: statistics.median(t) for name, t in times.items()}
    hw = med["handwritten"]
    result = {
        "workload": "smoke (K=6, L=100, B=32, assess 128, decide 2048)",
        "iterations_per_repeat": args.iters,
        "repeats": args.repeats,
        "compile_repeats": args.compile_repeats,
        "ev3core_step_median_s": med["ev3core_step"],
        "handwritten_jit_median_s": hw,
        "ratio_ev3core_over_handwritten": med["ev3core_step"] / hw,
        "ev3core_scan_per_iteration_median_s": med["ev3core_scan10"],
        "ratio_scan_over_handwritten": med["ev3core_scan10"] / hw,
        "ev3core_two_objectives_step_median_s": med["ev3core_step_two_objectives"],
        "ratio_two_objectives_over_handwritten": med["ev3core_step_two_objectives"] / hw,
        "compile_s": compile_s,
        "compile_stages_s": stages,
        "ev3core_test_accuracy_after_first_repeat": final_acc,
        "ratio_compile_ev3core_over_handwritten": compile_s["ev3core_step"]
        / compile_s["handwritten"],
        "target_ratio": 1.10,
        "target_compile_ratio": 1.10,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "devices": str(jax.devices()),
        },
    }
    print(f"ev3core step        median {med['ev3core_step'] * 1e3:8.3f} ms/iter")
    print(f"hand-written jit    median {hw * 1e3:8.3f} ms/iter")
    print(f"ratio ev3core/hand-written   {med['ev3core_step'] / hw:6.3f}   (target <= 1.10)")
    print(
        f"ev3core scan (10/call) median {med['ev3core_scan10'] * 1e3:6.3f} ms/iter  "
        f"ratio {med['ev3core_scan10'] / hw:.3f}"
    )
    print(
        f"smoke pipeline (+ NegCrossEntropy objective) median "
        f"{med['ev3core_step_two_objectives'] * 1e3:6.3f} ms/iter  "
        f"ratio {med['ev3core_step_two_objectives'] / hw:.3f}"
    )
    c = compile_s
    print(
        f"compile (median of {args.compile_repeats}): ev3core {c['ev3core_step']:.2f} s, "
        f"hand-written {c['handwritten']:.2f} s, scan {c['ev3core_scan10']:.2f} s, "
        f"two objectives {c['ev3core_step_two_objectives']:.2f} s; "
        f"ratio {c['ev3core_step'] / c['handwritten']:.2f} (target <= 1.10)"
    )
    for name, st in stages.items():
        print(
            f"stages, {name}: trace {st['trace']:.3f} s, lower {st['lower']:.3f} s, "
            f"XLA compile {st['compile']:.3f} s"
        )
    print(f"ev3core test accuracy after {args.iters + 1} iterations: {final_acc:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
