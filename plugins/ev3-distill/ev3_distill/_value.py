"""Equal-compute comparison machinery shared by the `value` experiment and
`benchmarks/value.py`: metrics, the alternatives (grid and random search with early stopping,
population-based training, plain training), EV3 arms vmapped over seeds, paired statistics.

Compute is counted in gradient evaluations: one optimizer step on one batch of `BATCH`
examples, for every candidate, population member and configuration.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PyTree

import ev3core as ev3
from ev3core import AbstractBatchAssessor, AbstractLoss
from ev3core._types import tree_index, tree_stack

BATCH = 32
ALTERNATIVES = ("grid", "random", "pbt", "plain")

_ADAM: dict[float, optax.GradientTransformation] = {}


def _adam(lr: float) -> optax.GradientTransformation:
    """One `optax.adam(lr)` object per learning rate, so that engines built for several seeds
    have equal static fields and share their compiled step."""
    return _ADAM.setdefault(float(lr), optax.adam(float(lr)))


# ---------------------------------------------------------------------------- metrics
def _predict(model: Any, x: Array) -> Array:
    return jnp.argmax(jax.vmap(model)(x), axis=-1)


def accuracy_of(model: Any, x: Array, y: Array) -> Array:
    return jnp.mean((_predict(model, x) == y).astype(jnp.float32))


def worst_class_of(model: Any, x: Array, y: Array, num_classes: int = 10) -> Array:
    hit = (_predict(model, x) == y).astype(jnp.float32)
    onehot = jax.nn.one_hot(y, num_classes)
    per = (hit @ onehot) / jnp.maximum(jnp.sum(onehot, axis=0), 1.0)
    return jnp.min(jnp.where(jnp.sum(onehot, axis=0) > 0, per, 1.0))


class WorstClassAccuracy(AbstractBatchAssessor):
    """Worst-class accuracy (the lowest per-class recall) as a batch-level objective.

    Per example the value encodes `label * num_classes + prediction`; `metric` rebuilds the
    weighted confusion diagonal from it.
    """

    num_classes: int = eqx.field(static=True, default=10)
    direction = "max"  # higher is better

    @property
    def name(self) -> str:
        return "worst_class_accuracy"

    def __call__(self, model: Any, batch: PyTree[Array]) -> Float[Array, " example"]:
        x, y = batch[0], batch[1]
        return (y * self.num_classes + _predict(model, x)).astype(jnp.float32)

    def metric(
        self, values: Float[Array, " example"], weights: Float[Array, " example"]
    ) -> Float[Array, ""]:
        v = values.astype(jnp.int32)
        y, pred = v // self.num_classes, v % self.num_classes
        onehot = jax.nn.one_hot(y, self.num_classes) * weights[:, None]
        total = jnp.sum(onehot, axis=0)
        hit = jnp.sum(onehot * (pred == y)[:, None], axis=0)
        per = hit / jnp.where(total > 0, total, 1.0)
        return jnp.min(jnp.where(total > 0, per, 1.0))


class WeightedCE(AbstractLoss):
    """Cross-entropy with label smoothing and per-class weights (array leaves), for batches
    `(x, y, ...)`: the candidate losses of scenarios (b) and (c)."""

    smoothing: Float[Array, ""]
    class_weights: Float[Array, " classes"]

    def __init__(self, smoothing: Any = 0.0, class_weights: Any = None, num_classes: int = 10):
        self.smoothing = jnp.asarray(smoothing, jnp.float32)
        self.class_weights = (
            jnp.ones((num_classes,), jnp.float32)
            if class_weights is None
            else jnp.asarray(class_weights, jnp.float32)
        )

    def __call__(self, model: Any, batch: PyTree[Array], key: Any) -> Float[Array, ""]:
        del key
        x, y = batch[0], batch[1]
        logits = jax.vmap(model)(x)
        n = logits.shape[-1]
        target = jax.nn.one_hot(y, n) * (1.0 - self.smoothing) + self.smoothing / n
        ce = optax.softmax_cross_entropy(logits, target)
        w = self.class_weights[y]
        return jnp.sum(w * ce) / jnp.sum(w)

    @property
    def label(self) -> str:
        try:
            s = float(self.smoothing)
            bal = float(jnp.max(self.class_weights)) != float(jnp.min(self.class_weights))
            return f"ce(s={s:g}{',balanced' if bal else ''})"
        except (TypeError, jax.errors.ConcretizationTypeError):
            return "ce"


# ---------------------------------------------------------------------------- training
def _train_step(static, loss, opt, train, batch: int):
    """One optimizer step on a batch of `batch` examples drawn with replacement from `train`
    (as the gradient proposer draws them), as a `lax.scan` body over `(params, opt_state)`
    carries and step keys."""
    n = jax.tree.leaves(train)[0].shape[0]

    def body(carry, k):
        p, o = carry
        k_idx, k_loss = jax.random.split(k)
        idx = jax.random.randint(k_idx, (batch,), 0, n)
        b = jax.tree.map(lambda a: a[idx], train)
        g = jax.grad(lambda p: loss(eqx.combine(p, static), b, k_loss))(p)
        u, o = opt.update(g, o, p)
        return (optax.apply_updates(p, u), o), None

    return body


def _fit(static, params, loss, opt, train, key, steps: int, batch: int):
    """Plain training of one model with one loss and one optimizer (pure; vmapped by the
    callers)."""
    body = _train_step(static, loss, opt, train, batch)
    (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), jax.random.split(key, steps))
    return params


@eqx.filter_jit
def fit_seeds(static, params, loss, opt, train, keys, steps: int, batch: int = BATCH):
    """`_fit` for every seed (leading axis of `params`, `train`, `keys`)."""
    return jax.vmap(lambda p, t, k: _fit(static, p, loss, opt, t, k, steps, batch))(
        params, train, keys
    )


def _curves(
    static,
    params0,
    loss_dyn,
    loss_static,
    lr,
    train,
    decide,
    test,
    key,
    score,
    rounds: int,
    every: int,
):
    """One configuration from `params0`: the decide and test metric at the start and after
    every `every` steps (`rounds` times). Returns two arrays `[rounds + 1]`."""
    loss = eqx.combine(loss_dyn, loss_static)
    opt = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(lr))  # = adam(lr)
    step = _train_step(static, loss, opt, train, BATCH)

    def chunk(carry, k):
        carry, _ = jax.lax.scan(step, carry, jax.random.split(k, every))
        m = eqx.combine(carry[0], static)
        return carry, (score(m, *decide), score(m, *test))

    m0 = eqx.combine(params0, static)
    _, (dec, tst) = jax.lax.scan(chunk, (params0, opt.init(params0)), jax.random.split(key, rounds))
    return (
        jnp.concatenate([score(m0, *decide)[None], dec]),
        jnp.concatenate([score(m0, *test)[None], tst]),
    )


@eqx.filter_jit
def search_curves(static, params0, losses, lrs, train, decide, test, keys, score, rounds, every):
    """`_curves` for every seed (outer axis) and configuration (inner axis of `losses`, `lrs`).

    `params0` has a seed axis (every configuration of a seed starts from the same model).
    Returns decide and test metrics `[seed, config, rounds + 1]`.
    """
    loss_dyn, loss_static = eqx.partition(losses, eqx.is_array)

    def per_seed(p0, tr, de, te, k):
        ks = k if k.ndim == 1 else jax.random.split(k, lrs.shape[0])
        return jax.vmap(
            lambda ld, lr, kk: _curves(
                static, p0, ld, loss_static, lr, tr, de, te, kk, score, rounds, every
            )
        )(loss_dyn, lrs, ks)

    return jax.vmap(per_seed)(params0, train, decide, test, keys)


def search_configs(static, params0, losses, lrs, train, decide, test, keys, score, rounds, every):
    """`search_curves` over configurations given as lists (`losses[i]` with `lrs[i]`) whose
    losses may be of several classes: the configurations are run in groups of one loss
    structure (stacked and vmapped) and returned in the order given, `[seed, config, rounds +
    1]`. Configuration `i` of a seed draws its batches from `fold_in(key, i)`."""
    groups: dict[Any, list[int]] = {}
    for i, loss in enumerate(losses):
        groups.setdefault(jax.tree.structure(loss), []).append(i)
    dec = [None] * len(losses)
    tst = [None] * len(losses)
    for idx in groups.values():
        d, t = search_curves(
            static,
            params0,
            tree_stack([losses[i] for i in idx]),
            jnp.asarray([lrs[i] for i in idx], jnp.float32),
            train,
            decide,
            test,
            jnp.stack([jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys) for i in idx], 1),
            score,
            rounds,
            every,
        )
        for j, i in enumerate(idx):
            dec[i], tst[i] = d[:, j], t[:, j]
    return jnp.stack(dec, 1), jnp.stack(tst, 1)


def search_arm(
    name: str,
    losses,
    lrs,
    static,
    params0,
    splits: tuple[Any, Any, Any],
    keys,
    score,
    rounds: int,
    every: int,
    **config: Any,
) -> dict[str, Any]:
    """Grid (`name == "grid"`: every loss with every learning rate) or random search
    (`losses[i]` with `lrs[i]`) with early stopping on the decide split: each configuration
    trained for `rounds * every` steps from `params0`, a checkpoint every `every` steps; the
    result of a method as the comparison records it. `splits` is `(train, decide, test)`."""
    t = time.perf_counter()
    if name == "grid":
        losses, lrs, labels = _grid_configs(losses, lrs)
    else:
        labels = [f"{c.label}|adam{r:.2g}" for c, r in zip(losses, lrs)]
    train, decide, test = splits
    dec, tst = search_configs(
        static, params0, list(losses), list(lrs), train, decide, test, keys, score, rounds, every
    )
    es = early_stopped(np.asarray(dec), np.asarray(tst))
    return {
        "test": es["test"].tolist(),
        "gradient_evaluations": len(labels) * rounds * every,
        "curve_x": [r * len(labels) * every for r in range(rounds + 1)],
        "curve": es["curve"].mean(0).tolist(),
        "chosen_config": [labels[i] for i in es["config"]],
        "chosen_step": (es["checkpoint"] * every).tolist(),
        "config": {"configs": labels, **config, "early_stopping_every": every},
        "wall_seconds": time.perf_counter() - t,
    }


def _grid_configs(losses, lrs):
    """The grid losses x learning rates in GradientProposer's candidate order (optimizer
    major, losses in order): `(losses, learning rates, labels)`, one entry per configuration."""
    ls = [loss for _ in lrs for loss in losses]
    lr = [float(lr) for lr in lrs for _ in losses]
    return ls, lr, [f"{c.label}|adam{r:g}" for c, r in zip(ls, lr)]


def early_stopped(dec: np.ndarray, tst: np.ndarray) -> dict[str, Any]:
    """Search with early stopping, per seed, from curves `[seed, config, checkpoints]`:
    the checkpoint with the best decide metric of the configuration with the best decide
    metric (first on ties). Also the selected test metric at every prefix of the budget."""
    S, C, R = dec.shape
    best_so_far = np.maximum.accumulate(dec, axis=2)
    # test metric at the best-decide checkpoint so far, per config
    arg = np.zeros((S, C, R), int)
    for r in range(1, R):
        better = dec[:, :, r] > best_so_far[:, :, r - 1]
        arg[:, :, r] = np.where(better, r, arg[:, :, r - 1])
    test_at = np.take_along_axis(tst, arg, axis=2)
    pick = np.argmax(best_so_far, axis=1)  # [S, R] config with the best decide metric so far
    curve = np.take_along_axis(test_at, pick[:, None, :], axis=1)[:, 0, :]
    return {
        "test": curve[:, -1],
        "curve": curve,  # [S, R]
        "config": pick[:, -1],
        "checkpoint": np.take_along_axis(arg[:, :, -1], pick[:, -1:], axis=1)[:, 0],
        "decide": np.take_along_axis(best_so_far[:, :, -1], pick[:, -1:], axis=1)[:, 0],
    }


# ---------------------------------------------------------------------------- EV3 (no growth)
@eqx.filter_jit
def ev3_seeds(engine, states, data, test, score, iterations: int):
    """`iterations` EV3 steps for every seed (leading axis of `states`, `data`, `test`);
    returns the final states and, per seed and iteration, the current model's test metric
    and whether the step accepted."""

    def one(state, d, te):
        def body(s, _):
            s, info = engine.step_pure(s, d)
            return s, (score(s.model, *te), info.accepted)

        return jax.lax.scan(body, state, None, length=iterations)

    return jax.vmap(one)(states, data, test)


@dataclasses.dataclass
class Budget:
    """EV3's shape: K candidates (from the configurations), trajectories of `trajectory`
    steps, `iterations` iterations; every other method gets `K * trajectory * iterations`."""

    trajectory: int
    iterations: int

    @property
    def lineage(self) -> int:
        return self.trajectory * self.iterations

    def total(self, k: int) -> int:
        return k * self.lineage


def engine_arm(engine, params0, static, data, test, keys, score, iterations: int) -> dict[str, Any]:
    """Run `engine` from every seed's starting model (vmapped over seeds): the final test
    metric per seed, the mean curve against total gradient evaluations, acceptances."""
    S = keys.shape[0]
    states = tree_stack(
        [engine.init(eqx.combine(tree_index(params0, i), static), keys[i]) for i in range(S)]
    )
    t = time.perf_counter()
    start = np.asarray(
        jax.vmap(lambda p, x, y: score(eqx.combine(p, static), x, y))(params0, *test)
    )
    states, (curve, accepted) = ev3_seeds(engine, states, data, test, score, iterations)
    curve = np.asarray(curve)
    final_decide = jax.vmap(lambda s, x, y: score(s.model, x, y))(states, *data.decide)
    per_step = ev3.gradient_evaluations(engine)
    return {
        "test": curve[:, -1].tolist(),
        "gradient_evaluations": per_step * iterations,
        "curve_x": [t * per_step for t in range(iterations + 1)],
        "curve": np.concatenate([start[:, None], curve], axis=1).mean(0).tolist(),
        "accepted": np.asarray(accepted).sum(1).tolist(),
        "final_decide": np.asarray(final_decide).tolist(),
        "config": {"candidates": list(engine.labels()), "iterations": iterations},
        "wall_seconds": time.perf_counter() - t,
    }


# ---------------------------------------------------------------------------- statistics
def paired_ci(a: list[float], b: list[float], level: float = 0.95) -> dict[str, float]:
    """Mean of `a - b` over seeds (paired) and its two-sided t interval."""
    from scipy import stats

    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    m = float(d.mean())
    if n < 2:
        return {"mean": m, "low": float("nan"), "high": float("nan"), "n": n}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return {"mean": m, "low": m - half, "high": m + half, "n": n}


def verdict(ci: dict[str, float]) -> str:
    if ci["low"] > 0:
        return "win"
    if ci["high"] < 0:
        return "loss"
    return "tie"


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """Mean / sd per method, the best alternative (highest mean test metric among the
    alternatives that ran) and the paired CI of EV3 minus it."""
    methods = res["methods"]
    table = {}
    for m, r in methods.items():
        v = r["test"]
        table[m] = {
            "mean": statistics.fmean(v),
            "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
            "gradient_evaluations": r["gradient_evaluations"],
        }
    alts = [m for m in ALTERNATIVES if m in methods]
    best = max(alts, key=lambda m: table[m]["mean"])
    ci = paired_ci(methods["ev3"]["test"], methods[best]["test"])
    out = {
        "table": table,
        "best_alternative": best,
        "ev3_minus_best": ci,
        "verdict": verdict(ci),
        "ev3_minus_each": {m: paired_ci(methods["ev3"]["test"], methods[m]["test"]) for m in alts},
    }
    if "start_test" in res:
        start = np.asarray(res["start_test"])
        out["below_start"] = {
            m: int(np.sum(np.asarray(methods[m]["test"]) < start)) for m in methods
        }
    return out
