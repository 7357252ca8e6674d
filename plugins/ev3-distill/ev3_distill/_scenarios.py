"""The value scenarios: training under label noise (symmetric or class-flip, from scratch or
from a pretrained start) and a non-differentiable target (worst-class accuracy on a
class-imbalanced training split), on the digits data set, with EV3 against grid and random
search with early stopping, population-based training and plain training at equal compute.

`run_label_scenario` runs one scenario for several seeds at once (vmapped); the `value`
experiment (`ev3 run --scenario NAME`) and `benchmarks/value.py` both use it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array

import ev3core as ev3
from ev3core import Accuracy, EV3Scheduler, Objective
from ev3core._types import tree_stack

from ._value import (
    BATCH,
    Budget,
    WeightedCE,
    WorstClassAccuracy,
    _adam,
    accuracy_of,
    engine_arm,
    fit_seeds,
    search_arm,
    search_curves,
    worst_class_of,
)

NOISE = 0.4
IMBALANCE = 10.0  # most / least frequent class in the imbalanced training split
PRETRAIN_STEPS = 1500
SCENARIOS = (
    "noise_sym_scratch",
    "noise_sym_pretrained",
    "noise_asym_scratch",
    "noise_asym_pretrained",
    "imbalance_worst_class",
)
# A class-flip noise: each class goes to a fixed look-alike class (a derangement of 0-9).
FLIP = np.array([6, 7, 3, 8, 9, 6, 5, 1, 3, 4])
FLIP[5] = 9  # 5 -> 9, 6 -> 5, 9 -> 4: no fixed points
assert np.all(FLIP != np.arange(10))


def _digits_mlp(key) -> Any:
    from ev3_distill import MLP

    return MLP(64, 10, (32, 32), key=key)


def _stack_splits(parts: list[dict[str, tuple[np.ndarray, ...]]]) -> dict[str, tuple[Array, ...]]:
    return {
        k: tuple(jnp.asarray(np.stack([p[k][i] for p in parts])) for i in range(len(parts[0][k])))
        for k in parts[0]
    }


def noisy_labels(y: np.ndarray, kind: str, rate: float, rng: np.random.Generator) -> np.ndarray:
    """`rate` of the labels corrupted: `"sym"` to a uniformly drawn other class, `"asym"` to
    the class's fixed look-alike (`FLIP`)."""
    flip = rng.random(len(y)) < rate
    if kind == "sym":
        other = (y + rng.integers(1, 10, len(y))) % 10
    else:
        other = FLIP[y]
    return np.where(flip, other, y).astype(np.int32)


def imbalanced_counts(rate: float = IMBALANCE, top: int = 80) -> np.ndarray:
    return np.floor(top * rate ** (-np.arange(10) / 9.0)).astype(int)


def build_label_problem(variant: str, seeds: list[int]) -> dict[str, Any]:
    """Data of scenario (b) or (c) for every seed, stacked on a leading seed axis.

    Digits (scikit-learn) splits of `ev3_distill.load_dataset(seed)`: assess, decide and test
    are untouched. (b): the training split's first 487 examples (clean labels) only pretrain
    the `pretrained` starting model; the other 500 get noisy labels and are what every method
    trains on. (c): the training split keeps `imbalanced_counts()` examples per class.
    """
    from ev3_distill import load_dataset

    parts, info = [], []
    for seed in seeds:
        s = load_dataset("digits", seed)
        rng = np.random.default_rng(10_000 + seed)
        x, y = s.train.x, s.train.y
        part: dict[str, Any] = {
            "assess": (s.assess.x, s.assess.y),
            "decide": (s.decide.x, s.decide.y),
            "test": (s.test.x, s.test.y),
        }
        if variant.startswith("noise"):
            kind = variant.split("_")[1]
            noisy = noisy_labels(y[487:], kind, NOISE, rng)
            part["train"] = (x[487:], noisy)
            part["pretrain"] = (x[:487], y[:487])
            info.append({"seed": seed, "noise_rate_realised": float(np.mean(noisy != y[487:]))})
        else:
            counts = imbalanced_counts()
            keep = []
            for c in range(10):
                idx = np.flatnonzero(y == c)
                if len(idx) < counts[c]:
                    raise AssertionError(f"digits seed {seed}: class {c} has {len(idx)} examples")
                keep.append(rng.choice(idx, counts[c], replace=False))
            keep = np.sort(np.concatenate(keep))
            part["train"] = (x[keep], y[keep])
            info.append({"seed": seed, "class_counts": counts.tolist()})
        parts.append(part)
    return {"data": _stack_splits(parts), "info": info}


def label_configs(variant: str, key, k_random: int, relabel: float | None = None):
    """EV3's candidate configurations (the grid) and `k_random` random ones from the same
    ranges: `(losses, learning rates)` for the grid, the same for random search. Under label
    noise, `relabel` adds `ev3core.Relabel(relabel)` to the grid (a development option, see
    docs/value.md), and random search then draws four loss families with the grid's odds."""
    lrs = (3e-4, 1e-3, 3e-3)
    counts = imbalanced_counts().astype(np.float32)
    balanced = (1.0 / counts) / np.mean(1.0 / counts)
    if variant.startswith("noise"):
        losses = [WeightedCE(0.0), WeightedCE(0.3), ev3.SelfDistill(0.8)]
    else:
        losses = [WeightedCE(0.0), WeightedCE(0.0, balanced)]
    k_lr, k_h = jax.random.split(key)
    r_lr = np.asarray(
        jnp.exp(
            jax.random.uniform(k_lr, (k_random,), minval=math.log(lrs[0]), maxval=math.log(lrs[-1]))
        )
    )
    u = np.asarray(jax.random.uniform(k_h, (k_random,)))
    if variant.startswith("noise") and relabel is not None:
        losses.append(ev3.Relabel(relabel))
        r_losses = [
            ev3.Relabel(float(v) * 4 - 3)
            if v > 0.75
            else (ev3.SelfDistill(float(v) * 4 - 2) if v > 0.5 else WeightedCE(0.6 * float(v)))
            for v in u
        ]
    elif variant.startswith("noise"):
        # the loss family drawn with the grid's odds, its weight from the grid's range
        r_losses = [
            ev3.SelfDistill(float(v) * 3 - 2) if v > 2 / 3 else WeightedCE(0.45 * float(v))
            for v in u
        ]
    else:
        r_losses = [
            WeightedCE(0.0, (counts ** -float(v)) / np.mean(counts ** -float(v))) for v in u
        ]
    return (losses, lrs), (r_losses, tuple(float(v) for v in r_lr))


def _seed_keys(scenario: str, seeds: list[int]) -> Array:
    tag = sum(ord(c) * 31**i for i, c in enumerate(scenario)) % (2**31)
    return jnp.stack([jax.random.fold_in(jax.random.key(seed), tag) for seed in seeds])


def _target(variant: str):
    """The scenario's target assessor and its `Objective` (the metric that decides)."""
    if variant.startswith("imbalance"):
        a = WorstClassAccuracy()
        return a, Objective("worst_class_accuracy", metric=a)
    return Accuracy(), Objective("accuracy")


def decide_alpha(variant: str) -> float:
    """EV3's safety level per scenario: one standard error (an 84% one-sided level) when
    training from scratch, where most moves are real gains; the library's default of four
    when fine-tuning a model that is already good, where a harmful move is the risk (chosen on
    development seeds 100-109, see docs/value.md)."""
    return 4.0 if variant.endswith("pretrained") else 1.0


def label_engine(
    variant: str, losses, lrs, budget: Budget, sizes: dict[str, int], alpha: float | None = None
) -> ev3.Engine:
    """EV3's recommended configuration for scenarios (b) and (c): the candidate grid losses x
    Adam learning rates as evolving candidates (`Evolve`: learning rates follow the accepted
    candidate's, only the worse half of the lineages restart on an acceptance), lineages that
    continue while rejected (`on_reject="continue"`), the scenario's target metric decides on
    the whole decide split at the scenario's safety level (`decide_alpha(variant)`)."""
    target, objective = _target(variant)
    proposer = ev3.GradientProposer(
        losses=losses,
        optimizers=[ev3.Optimizer(optax.adam, learning_rate=lr) for lr in lrs],
        optimizer_names=[f"adam{lr:g}" for lr in lrs],
        steps=budget.trajectory,
        batch_size=BATCH,
        on_reject="continue",
        evolve=ev3.Evolve(names=("learning_rate",), pull=0.5, sigma=0.2, truncate=0.5),
    )
    return ev3.Pipeline(
        proposers=[proposer],
        assessors=[target],
        scheduler=EV3Scheduler(
            assess_alpha=0.5,
            decide_alpha=decide_alpha(variant) if alpha is None else alpha,
            objectives=[objective],
        ),
        assess_size=sizes["assess"],
        decide_size=sizes["decide"],
    ).build()


def pbt_engine(losses, lrs, budget: Budget, target, decide_size: int, names=("learning_rate",)):
    """Population-based training (`ev3core.PBTProposer` with the `always_accept` scheduler):
    one member per configuration, ready every `trajectory` steps, the bottom quarter copies
    the top quarter (parameters and optimizer state) and perturbs `names` by x0.8 / x1.2 or
    resamples them. Members are ranked on the assess stream, to which the decide split is
    passed (`Data(assess=decide)`), so the current model is the best member on it."""
    proposer = ev3.PBTProposer(
        losses=losses,
        optimizers=[ev3.Optimizer(optax.adam, learning_rate=lr) for lr in lrs],
        optimizer_names=[f"adam{lr:g}" for lr in lrs],
        steps=budget.trajectory,
        batch_size=BATCH,
        names=names,
    )
    return ev3.Pipeline(
        proposers=[proposer],
        assessors=[target],
        scheduler="always_accept",
        assess_size=decide_size,
        decide_size=decide_size,
    ).build()


def _engine_arms(
    variant: str,
    losses: Any,
    lrs: Any,
    budget: Budget,
    params0: Any,
    static: Any,
    d: dict[str, Any],
    keys: tuple[Any, Any],
    score: Any,
    sizes: dict[str, int],
    *,
    relabel: float | None = None,
    alpha: float | None = None,
) -> dict[str, Any]:
    """The EV3 and PBT arms: engines over the same configurations, every seed at once."""
    k_ev3, k_pbt = keys
    arms: dict[str, Any] = {}
    # --- EV3
    data = ev3.Data(propose=d["train"], assess=d["assess"], decide=d["decide"])
    engine = label_engine(variant, losses, lrs, budget, sizes, alpha)
    arms["ev3"] = engine_arm(
        engine, params0, static, data, d["test"], k_ev3, score, budget.iterations
    )
    arms["ev3"]["config"] |= {
        "trajectory": budget.trajectory,
        "decide_alpha": decide_alpha(variant) if alpha is None else alpha,
        "relabel": relabel,
        "evolve": "learning_rate, pull 0.5, sigma 0.2, truncate 0.5",
    }

    # --- PBT: same K, N = trajectory, T rounds, ranked on the decide split
    target, _ = _target(variant)
    pbt = pbt_engine(losses, lrs, budget, target, sizes["decide"])
    pbt_data = ev3.Data(propose=d["train"], assess=d["decide"], decide=d["decide"])
    arms["pbt"] = engine_arm(
        pbt, params0, static, pbt_data, d["test"], k_pbt, score, budget.iterations
    )
    arms["pbt"]["config"] |= {
        "ready_every": budget.trajectory,
        "quantile": 0.25,
        "perturb": [0.8, 1.2],
        "resample_probability": 0.25,
    }
    return arms


def _plain_arm(
    loss: Any,
    total: int,
    budget: Budget,
    static: Any,
    params0: Any,
    d: dict[str, Any],
    key: Any,
    score: Any,
) -> dict[str, Any]:
    """Plain training: the default configuration, all the compute, the final model."""
    t = time.perf_counter()
    rounds = total // budget.trajectory
    _, tst = search_curves(
        static,
        params0,
        tree_stack([loss]),
        jnp.asarray([1e-3], jnp.float32),
        d["train"],
        d["decide"],
        d["test"],
        key,
        score,
        rounds,
        budget.trajectory,
    )
    tst = np.asarray(tst)[:, 0, :]
    return {
        "test": tst[:, -1].tolist(),
        "gradient_evaluations": rounds * budget.trajectory,
        "curve_x": [r * budget.trajectory for r in range(rounds + 1)],
        "curve": tst.mean(0).tolist(),
        "config": {
            "loss": loss.label,
            "learning_rate": 1e-3,
            "steps": rounds * budget.trajectory,
        },
        "wall_seconds": time.perf_counter() - t,
    }


def run_label_scenario(
    variant: str,
    seeds: list[int],
    budget: Budget,
    log,
    *,
    relabel: float | None = None,
    alpha: float | None = None,
) -> dict[str, Any]:
    """Scenario (b) or (c) for every seed at once (vmapped over seeds and configurations).

    `relabel` (see `label_configs`) and `alpha` (EV3's `decide_alpha` instead of
    `decide_alpha(variant)`) are development options, recorded in the result."""
    t0 = time.perf_counter()
    prob = build_label_problem(variant, seeds)
    d = prob["data"]
    score = worst_class_of if variant.startswith("imbalance") else accuracy_of
    keys = _seed_keys(variant, seeds)
    k_init, k_pre, k_ev3, k_grid, k_rand, k_cfg, k_plain, k_pbt = (
        jnp.stack([jax.random.fold_in(k, i) for k in keys]) for i in range(8)
    )
    models = [_digits_mlp(k) for k in k_init]
    params0, static = eqx.partition(tree_stack(models), eqx.is_array)
    if variant.endswith("pretrained"):
        params0 = fit_seeds(
            static, params0, WeightedCE(0.0), _adam(1e-3), d["pretrain"], k_pre, PRETRAIN_STEPS
        )
    start_test = np.asarray(
        jax.vmap(lambda p, x, y: score(eqx.combine(p, static), x, y))(params0, *d["test"])
    )
    (losses, lrs), _ = label_configs(variant, k_cfg[0], 0, relabel)
    K = len(losses) * len(lrs)
    _, (r_losses, r_lrs) = label_configs(
        variant, k_cfg[0], K, relabel
    )  # random search of the same size
    total = budget.total(K)
    out: dict[str, Any] = {
        "scenario": variant,
        "metric": "worst_class_accuracy" if variant.startswith("imbalance") else "accuracy",
        "seeds": seeds,
        "data": prob["info"],
        "sizes": {k: int(v[0].shape[1]) for k, v in d.items()},
        "start_test": start_test.tolist(),
        "methods": {},
    }

    out["methods"] |= _engine_arms(
        variant,
        losses,
        lrs,
        budget,
        params0,
        static,
        d,
        (k_ev3, k_pbt),
        score,
        out["sizes"],
        relabel=relabel,
        alpha=alpha,
    )
    # --- grid and random search with early stopping
    for name, (ls, lr_list), kk in (
        ("grid", (losses, lrs), k_grid),
        ("random", (r_losses, r_lrs), k_rand),
    ):
        out["methods"][name] = search_arm(
            name,
            ls,
            lr_list,
            static,
            params0,
            (d["train"], d["decide"], d["test"]),
            kk,
            score,
            budget.iterations,
            budget.trajectory,
        )

    out["methods"]["plain"] = _plain_arm(
        losses[0], total, budget, static, params0, d, k_plain, score
    )
    out["wall_seconds"] = time.perf_counter() - t0
    return out
