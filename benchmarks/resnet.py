"""ResNet benchmark: one EV3 iteration on a ResNet-8 student with BatchNorm against a
hand-written vmapped optax loop training the same candidates, in the same run.

Workload (issue 13): ResNet-8 (`ev3_distill.ResNet`, widths 16-32-64, BatchNorm), K = 6
candidates (cross-entropy at temperatures {0.5, 1, 2} x {SGD 0.05 momentum 0.9, SGD 0.02
momentum 0.9}), trajectories of `--steps` optimizer steps of batch 128, synthetic
32x32x3 data with 10 classes. The EV3 iteration also assesses the K + 2 models on 256
examples and decides on 512; the hand-written loop only trains (so the ratio includes
EV3's assessment, decision and state threading). Both train in training mode with the
running statistics threaded through the trajectory.

    python benchmarks/resnet.py --json benchmarks/resnet.json [--steps 5] [--iters 5]

Prints the median seconds per iteration of each, their ratio (target <= 1.3), compile times
and the compiled programs' memory (`memory_analysis`: arguments + outputs + temporaries;
and the device's peak bytes where the backend reports it); writes the same to `--json`.
Runs unchanged on CPU and GPU.
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
from ev3_distill import make_resnet

import ev3core as ev3

TEMPS = (0.5, 1.0, 2.0)
LRS = (0.05, 0.02)
B, N, CLASSES, N_ASSESS, N_DECIDE = 128, 4096, 10, 256, 512


def _data(key):
    kx, ky = jax.random.split(key)
    x = jax.random.uniform(kx, (N, 32, 32, 3))
    y = jax.random.randint(ky, (N,), 0, CLASSES)
    return ev3.Data(propose=(x, y), assess=(x[:1024], y[:1024]), decide=(x[1024:], y[1024:]))


def _engine(steps):
    proposer = ev3.GradientProposer(
        [ev3.CrossEntropy(t) for t in TEMPS],
        [optax.sgd(lr, momentum=0.9) for lr in LRS],
        steps=steps,
        batch_size=B,
    )
    return ev3.Engine([proposer], [ev3.Accuracy()], ev3.EV3Scheduler(), N_ASSESS, N_DECIDE)


def _handwritten(model, steps):
    """Train the same 6 candidates directly: vmap over candidates, lax.scan over steps."""
    params, static = eqx.partition(model, eqx.is_array)
    net_static = static.model
    temps = jnp.tile(jnp.asarray(TEMPS, jnp.float32), len(LRS))
    opts = [optax.sgd(lr, momentum=0.9) for lr in LRS]
    nt = len(TEMPS)

    def loss(w, bn, x, y, t, k):
        net = eqx.nn.inference_mode(eqx.combine(w, net_static), False)
        keys = jax.random.split(k, x.shape[0])
        logits, bn = jax.vmap(
            lambda xi, ki: net(xi, bn, key=ki), axis_name="batch", out_axes=(0, None)
        )(x, keys)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits * t, y)), bn

    def step_one(opt, w, bn, o, x, y, t, k):
        (_, bn), g = jax.value_and_grad(loss, has_aux=True)(w, bn, x, y, t, k)
        u, o = opt.update(g, o, w)
        return optax.apply_updates(w, u), bn, o

    @jax.jit
    def train(w0, bn0, opt_states, x, y, key):
        idx = jax.random.randint(key, (steps, len(temps), B), 0, x.shape[0])
        keys = jax.random.split(key, (steps, len(temps)))
        carry = []
        for j, _ in enumerate(opts):
            stack = lambda a: jnp.broadcast_to(a, (nt,) + a.shape)  # noqa: E731
            carry.append((jax.tree.map(stack, w0), jax.tree.map(stack, bn0), opt_states[j]))

        def body(c, xs):
            i_t, k_t = xs
            out = []
            for j, (opt, (w, bn, o)) in enumerate(zip(opts, c)):
                sl = slice(j * nt, (j + 1) * nt)
                f = lambda w, bn, o, i, t, k, opt=opt: step_one(opt, w, bn, o, x[i], y[i], t, k)  # noqa: E731
                out.append(jax.vmap(f)(w, bn, o, i_t[sl], temps[sl], k_t[sl]))
            return tuple(out), None

        c, _ = jax.lax.scan(body, tuple(carry), (idx, keys))
        return c

    opt_states = [
        jax.tree.map(lambda a: jnp.broadcast_to(a, (nt,) + a.shape), o.init(params.model))
        for o in opts
    ]
    return train, (params.model, params.state, opt_states)


def _memory(compiled):
    compiled = getattr(compiled, "compiled", compiled)  # an `eqx.filter_jit`'s wraps JAX's
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def _peak():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per trajectory")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations (after warm-up)")
    args = ap.parse_args()

    data = _data(jax.random.key(0))
    net, bn = make_resnet((32, 32, 3), CLASSES, depth=8, key=jax.random.key(1))
    model = ev3.Stateful(net, bn)
    engine = _engine(args.steps)
    state = engine.init(model, jax.random.key(2))

    t0 = time.perf_counter()
    step = eqx.filter_jit(engine.step_pure).lower(state, data).compile()
    ev3_compile = time.perf_counter() - t0
    ev3_memory = _memory(step)
    train, hw_args = _handwritten(model, args.steps)
    x, y = data.propose
    t0 = time.perf_counter()
    hw = train.lower(*hw_args, x, y, jax.random.key(3)).compile()
    hw_compile = time.perf_counter() - t0
    hw_memory = _memory(hw)

    state, _ = step(state, data)  # warm-up
    jax.block_until_ready(hw(*hw_args, x, y, jax.random.key(3)))
    ev3_times, hw_times = [], []
    for i in range(args.iters):  # interleaved, so both see the same machine load
        t0 = time.perf_counter()
        state, info = step(state, data)
        jax.block_until_ready(state)
        ev3_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(hw(*hw_args, x, y, jax.random.key(10 + i)))
        hw_times.append(time.perf_counter() - t0)
    ev3_s, hw_s = statistics.median(ev3_times), statistics.median(hw_times)
    out = {
        "workload": f"ResNet-8 BatchNorm, K=6, {args.steps} steps of batch {B}, 32x32x3",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "machine": platform.processor() or platform.machine(),
        "ev3_seconds_per_iteration": ev3_s,
        "handwritten_seconds_per_iteration": hw_s,
        "ratio": ev3_s / hw_s,
        "target_ratio": 1.3,
        "ev3_compile_seconds": ev3_compile,
        "handwritten_compile_seconds": hw_compile,
        "ev3_program_bytes": ev3_memory,
        "handwritten_program_bytes": hw_memory,
        "memory_ratio": None if not (ev3_memory and hw_memory) else ev3_memory / hw_memory,
        "device_peak_bytes": _peak(),
        "iters": args.iters,
    }
    for k, v in out.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
