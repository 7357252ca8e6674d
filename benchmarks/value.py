"""Does EV3 beat what a user would do instead, at equal TOTAL compute?

Every method gets the same total number of gradient evaluations (one optimizer step on one
batch of `BATCH` examples, counted for every candidate, every population member and every
grid point), the same splits, the same teacher and the same decide split for any selection;
the test split is only ever used to report. Methods:

- `ev3`: EV3 in the library's recommended configuration for the scenario (see
  `docs/value.md`): K candidates, trajectories of L steps, T iterations: `K * L * T`
  gradient evaluations.
- `grid`: every one of EV3's K candidate configurations trained on its own for `L * T`
  steps (so `K * L * T` in all), checkpoints every L steps (and the start), the checkpoint
  with the best decide metric of the config with the best decide metric is returned
  (early stopping).
- `random`: K configurations drawn at random from the ranges the grid spans, otherwise as
  `grid`.
- `pbt`: population-based training (ev3core's PBT component) with K members, ready every
  L steps, T rounds, ranked on the decide split; the best member on the decide split is
  returned.
- `plain`: the default configuration trained for all `K * L * T` steps, the final model (what
  plain training or fine-tuning gives).

Scenarios (each `SEEDS` seeds; a seed fixes the splits, the teacher, the noise, the starting
model and every method's randomness):

- (a) `distill_digits`, `distill_mnist1d`: knowledge distillation with growth (digits: MLP
  student; MNIST-1D: 1-D CNN student family); EV3 is the distillation plugin's job
  (`ev3_distill.run_ev3`), which starts small and grows; the other methods train the student
  at the size cap.
- (b) `noise_{sym,asym}_{scratch,pretrained}`: digits with 40% symmetric or class-flip noise
  on the training labels (clean assess / decide / test), from a fresh model or from a model
  pretrained on a disjoint clean split.
- (c) `imbalance_worst_class`: digits with a class-imbalanced training split (ratio
  `IMBALANCE`), decided and reported on worst-class accuracy (a non-differentiable target).

Prints one table per scenario (mean +- sd of the test metric, the compute of each method)
and the paired difference EV3 - best alternative with its 95% CI over seeds (t interval,
paired by seed); writes every per-seed figure to the JSON and the plot to `docs/value.png`.

```bash
.venv/bin/python benchmarks/value.py --json benchmarks/value.json
.venv/bin/python benchmarks/value.py --quick --json /tmp/value_quick.json
```
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ev3_distill import (
    CNN,
    MLP,
    DistillConfig,
    DistillLoss,
    LabelLoss,
    default_pipeline,
    load_dataset,
    run_ev3,
)
from ev3_distill._config import make_student
from ev3_distill._scenarios import (  # noqa: F401 - the scenarios' building blocks, re-exported
    IMBALANCE,
    NOISE,
    PRETRAIN_STEPS,
    _digits_mlp,
    _seed_keys,
    build_label_problem,
    label_configs,
    label_engine,
    pbt_engine,
    run_label_scenario,
)
from ev3_distill._train import logits_of, shift_augmented_loss
from ev3_distill._value import (  # noqa: F401
    ALTERNATIVES,
    BATCH,
    Budget,
    WeightedCE,
    WorstClassAccuracy,
    _adam,
    _grid_configs,
    accuracy_of,
    early_stopped,
    engine_arm,
    ev3_seeds,
    fit_seeds,
    paired_ci,
    search_arm,
    search_configs,
    search_curves,
    summarise,
    verdict,
    worst_class_of,
)

import ev3core as ev3
from ev3core import Accuracy
from ev3core._types import tree_index, tree_stack

METHODS = ("ev3", "grid", "random", "pbt", "plain")
GROUPS = {
    "a": ("distill_digits", "distill_mnist1d"),
    "b": (
        "noise_sym_scratch",
        "noise_sym_pretrained",
        "noise_asym_scratch",
        "noise_asym_pretrained",
    ),
    "c": ("imbalance_worst_class",),
}
# A class-flip noise: each class goes to a fixed look-alike class (a derangement of 0-9).
FLIP = np.array([6, 7, 3, 8, 9, 6, 5, 1, 3, 4])
FLIP[5] = 9  # 5 -> 9, 6 -> 5, 9 -> 4: no fixed points
assert np.all(FLIP != np.arange(10))


# ---------------------------------------------------------------------------- scenario (a)
def distill_config(dataset: str, seed: int, budget: Budget):
    """The distillation job's recommended configuration (`ev3 run` defaults) at this budget;
    MNIST-1D uses the 1-D CNN student family (4 channels, growing to two convolutions of 8)."""
    extra = {"student": "cnn", "start_width": 4, "max_width": 8} if dataset == "mnist1d" else {}
    return DistillConfig(
        dataset=dataset,
        seed=seed,
        steps=budget.iterations,
        trajectory=budget.trajectory,
        baseline=False,
        **extra,
    )


def _distill_pipeline(splits):
    """`ev3_distill.default_pipeline` with one optimizer object per learning rate (so the
    seeds share compiled steps); otherwise exactly the job's default."""

    def make(num_teachers, cfg):
        pipe = default_pipeline(
            num_teachers, cfg, assess_size=len(splits.assess), decide_size=len(splits.decide)
        )
        p = pipe.proposers[0]
        pipe.proposers = (
            ev3.GradientProposer(
                losses=p.losses,
                optimizers=[_adam(lr) for lr in cfg.learning_rates],
                optimizer_names=p.optimizer_names,
                steps=p.steps,
                batch_size=p.batch_size,
                on_reject=p.on_reject,
            ),
        )
        return pipe

    return make


def _teachers(dataset: str, splits_list, keys, steps: int):
    """A teacher per seed, all seeds at once. Digits: the job's recipe
    (`ev3_distill.train_teacher`: MLP 64-256-256-10, shifted inputs, AdamW with a cosine
    schedule, batch 64) for `steps` steps; MNIST-1D: a smaller 1-D CNN than the job's (two
    convolutions of 16 channels, a 64-unit dense layer; AdamW 1e-3, batch 32), to fit the
    benchmark's time on two CPU cores."""
    s0 = splits_list[0]
    k_model = [jax.random.split(k)[0] for k in keys]
    if dataset == "digits":
        models = [MLP(s0.in_features, 10, (256, 256), key=k) for k in k_model]
        loss: Any = shift_augmented_loss(s0.in_shape)
        opt = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)
    else:
        models = [CNN(s0.in_shape, 10, (16, 16), hidden=64, key=k) for k in k_model]
        loss = LabelLoss()
        opt = optax.adamw(1e-3, weight_decay=1e-4)
    params, static = eqx.partition(tree_stack(models), eqx.is_array)
    batch = 64 if dataset == "digits" else 32
    train = (
        jnp.asarray(np.stack([s.train.x for s in splits_list])),
        jnp.asarray(np.stack([s.train.y for s in splits_list])),
    )
    k_train = jnp.stack([jax.random.split(k)[1] for k in keys])
    params = fit_seeds(static, params, loss, opt, train, k_train, steps, batch)
    return [eqx.combine(tree_index(params, i), static) for i in range(len(splits_list))]


def run_distill_scenario(
    dataset: str,
    seeds: list[int],
    budget: Budget,
    quick: bool,
    log,
    at_cap: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Scenario (a) on one data set: EV3 with growth against the searches at the cap size.

    Development options: `at_cap` starts EV3 from the searches' cap-size student and does
    not grow it; `overrides` replaces fields of EV3's `DistillConfig`."""
    t0 = time.perf_counter()
    name = f"distill_{dataset}"
    splits_list = [load_dataset(dataset, s) for s in seeds]
    keys = _seed_keys(name, seeds)
    k_teach, k_ev3, k_init, k_grid, k_rand, k_cfg, k_plain, k_pbt = (
        jnp.stack([jax.random.fold_in(k, i) for k in keys]) for i in range(8)
    )
    teachers = _teachers(
        dataset, splits_list, k_teach, 300 if quick else (1000 if dataset == "digits" else 1500)
    )
    teacher_test = [
        float(accuracy_of(t, jnp.asarray(s.test.x), jnp.asarray(s.test.y)))
        for t, s in zip(teachers, splits_list)
    ]
    log(f"{name}: teachers {np.round(teacher_test, 3).tolist()} ({time.perf_counter() - t0:.0f} s)")
    cfg0 = dataclasses.replace(distill_config(dataset, seeds[0], budget), **(overrides or {}))

    # --- EV3: the distillation job (grows the student; K changes with the passes)
    ev3_test, ev3_total, start_test, curves, xs, counts, growth, params_n = (
        [],
        [],
        [],
        [],
        [],
        [],
        [],
        [],
    )
    t = time.perf_counter()
    labels = None
    for i, (seed, splits, teacher) in enumerate(zip(seeds, splits_list, teachers)):
        cfg = dataclasses.replace(distill_config(dataset, seed, budget), **(overrides or {}))
        student = None
        if at_cap:
            cfg = dataclasses.replace(cfg, grow=False)
            student = make_student(splits, cfg, k_init[i], cfg.cap_widths)
        res = run_ev3(
            splits, teacher, cfg, k_ev3[i], pipeline=_distill_pipeline(splits), student=student
        )
        model = res.state.model
        ev3_test.append(
            float(accuracy_of(model, jnp.asarray(splits.test.x), jnp.asarray(splits.test.y)))
        )
        ev3_total.append(int(res.gradient_evaluations))
        start_test.append(res.start_test_accuracy)
        curves.append([res.start_test_accuracy] + [r["test_accuracy"] for r in res.metrics])
        xs.append([0] + [r["explored_steps"] for r in res.metrics])
        counts.append(res.counts)
        growth.append(res.growth)
        params_n.append(sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))))
        if labels is None:
            labels = [lab for lab in _distill_pipeline(splits)(1, cfg).build().labels()]
        log(
            f"  {name} seed {seed}: EV3 {ev3_test[-1]:.4f} ({ev3_total[-1]} evaluations, "
            f"{res.counts['accepted']} accepted, {len(res.growth)} growths, "
            f"{time.perf_counter() - t:.0f} s)"
        )
    ev3_wall = time.perf_counter() - t
    if len(set(ev3_total)) != 1:
        raise AssertionError(f"EV3's compute differs between seeds: {ev3_total}")
    total = ev3_total[0]
    K = len(labels)
    out: dict[str, Any] = {
        "scenario": name,
        "metric": "accuracy",
        "seeds": seeds,
        "sizes": splits_list[0].sizes(),
        "teacher_test": teacher_test,
        "methods": {
            "ev3": {
                "test": ev3_test,
                "gradient_evaluations": total,
                "curve_x": np.mean(xs, axis=0).tolist(),
                "curve": np.mean(curves, axis=0).tolist(),
                "start_test": start_test,
                "counts": counts,
                "growth": growth,
                "params": params_n,
                "config": dataclasses.asdict(cfg0) | {"first_pass_candidates": labels},
                "wall_seconds": ev3_wall,
            }
        },
    }

    # --- the searches train the student at EV3's size cap on EV3's first-pass candidates
    students = [make_student(s, cfg0, k, cfg0.cap_widths) for s, k in zip(splits_list, k_init)]
    params0, static = eqx.partition(tree_stack(students), eqx.is_array)
    stack = lambda f: tuple(jnp.asarray(np.stack([f(s)[j] for s in splits_list])) for j in range(2))
    train = (
        *stack(lambda s: (s.train.x, s.train.y)),
        jnp.stack(
            [
                logits_of(t, jnp.asarray(s.train.x))[:, None, :]
                for t, s in zip(teachers, splits_list)
            ]
        ),
    )
    decide = stack(lambda s: (s.decide.x, s.decide.y))
    test = stack(lambda s: (s.test.x, s.test.y))
    grid_losses = [DistillLoss(1.0, 0.0)] + [
        DistillLoss(tt, w) for tt in cfg0.temperatures for w in cfg0.weights
    ]
    per_config = total // K
    rounds = per_config // budget.trajectory
    r_u = np.asarray(jax.random.uniform(k_cfg[0], (3, K)))
    lo, hi = min(cfg0.learning_rates), max(cfg0.learning_rates)
    r_losses = [
        DistillLoss(
            min(cfg0.temperatures) + u0 * (max(cfg0.temperatures) - min(cfg0.temperatures)),
            u1 * max(cfg0.weights),
        )
        for u0, u1 in zip(r_u[0], r_u[1])
    ]
    r_lrs = [math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) for u in r_u[2]]
    for mname, (ls, lr_list), kk in (
        ("grid", (grid_losses, cfg0.learning_rates), k_grid),
        ("random", (r_losses, r_lrs), k_rand),
    ):
        out["methods"][mname] = search_arm(
            mname,
            ls,
            lr_list,
            static,
            params0,
            (train, decide, test),
            kk,
            accuracy_of,
            rounds,
            budget.trajectory,
            student_widths=list(cfg0.cap_widths),
        )
    # --- plain distillation (the job's baseline: T=4, w=0.9, Adam 1e-3), all the compute
    t = time.perf_counter()
    prounds = total // budget.trajectory
    _, tst = search_curves(
        static,
        params0,
        tree_stack([DistillLoss(cfg0.baseline_temperature, cfg0.baseline_weight)]),
        jnp.asarray([cfg0.baseline_learning_rate], jnp.float32),
        train,
        decide,
        test,
        k_plain,
        accuracy_of,
        prounds,
        budget.trajectory,
    )
    tst = np.asarray(tst)[:, 0, :]
    out["methods"]["plain"] = {
        "test": tst[:, -1].tolist(),
        "gradient_evaluations": prounds * budget.trajectory,
        "curve_x": [r * budget.trajectory for r in range(prounds + 1)],
        "curve": tst.mean(0).tolist(),
        "config": {
            "loss": f"kd(T={cfg0.baseline_temperature:g},w={cfg0.baseline_weight:g})",
            "learning_rate": cfg0.baseline_learning_rate,
        },
        "wall_seconds": time.perf_counter() - t,
    }
    # --- PBT over the same configurations at the cap size, ranked on the decide split
    iters = total // (K * budget.trajectory)
    pbt = pbt_engine(
        grid_losses,
        cfg0.learning_rates,
        budget,
        Accuracy(),
        int(decide[1].shape[1]),
        names=("learning_rate", "temperature"),
    )
    pbt_data = ev3.Data(propose=train, assess=decide, decide=decide)
    out["methods"]["pbt"] = engine_arm(
        pbt, params0, static, pbt_data, test, k_pbt, accuracy_of, iters
    )
    out["methods"]["pbt"]["config"] |= {
        "ready_every": budget.trajectory,
        "quantile": 0.25,
        "perturb": [0.8, 1.2],
        "resample_probability": 0.25,
        "explored": ["learning_rate", "temperature"],
    }
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def group_summary(results: dict[str, dict[str, Any]], names: tuple[str, ...]) -> dict[str, Any]:
    """A scenario with several variants: per seed, EV3 minus the best alternative averaged
    over the variants (the best alternative is chosen per variant), and its paired CI."""
    have = [n for n in names if n in results]
    if not have:
        return {}
    diffs = []
    for n in have:
        best = results[n]["summary"]["best_alternative"]
        m = results[n]["methods"]
        diffs.append(np.asarray(m["ev3"]["test"]) - np.asarray(m[best]["test"]))
    d = np.mean(diffs, axis=0)
    ci = paired_ci(d.tolist(), [0.0] * len(d))
    return {"variants": have, "ev3_minus_best": ci, "verdict": verdict(ci)}


def print_table(name: str, res: dict[str, Any], log) -> None:
    s = res["summary"]
    log(f"\n== {name} ({res['metric']}, {len(res['seeds'])} seeds) ==")
    if "start_test" in res:
        st = res["start_test"]
        log(f"  start model       {statistics.fmean(st):.4f}")
    for m in METHODS:
        if m not in s["table"]:
            continue
        row = s["table"][m]
        extra = ""
        if "below_start" in s:
            extra = f"  below start on {s['below_start'][m]}/{len(res['seeds'])} seeds"
        log(
            f"  {m:8s} {row['mean']:.4f} +- {row['sd']:.4f}   gradient evaluations "
            f"{row['gradient_evaluations']:>8}{extra}"
        )
    ci = s["ev3_minus_best"]
    log(
        f"  EV3 - best alternative ({s['best_alternative']}): {ci['mean']:+.4f} "
        f"[{ci['low']:+.4f}, {ci['high']:+.4f}] -> {s['verdict']}"
    )


def markdown(out: dict[str, Any]) -> str:
    """The results as Markdown tables (for docs/value.md)."""
    lines = []
    for name, res in out["scenarios"].items():
        s = res["summary"]
        n = len(res["seeds"])
        lines += [f"**{name}** (test {res['metric']}, {n} seeds)", ""]
        head = "| method | mean ± sd | gradient evaluations |"
        sep = "|---|---|---|"
        if "below_start" in s:
            head += " below the start model |"
            sep += "---|"
        lines += [head, sep]
        if "start_test" in res:
            st = res["start_test"]
            lines.append(
                f"| start model | {statistics.fmean(st):.4f} ± {statistics.stdev(st):.4f} | 0 |"
                + (" |" if "below_start" in s else "")
            )
        for m in METHODS:
            if m not in s["table"]:
                continue
            row = s["table"][m]
            line = (
                f"| {m} | {row['mean']:.4f} ± {row['sd']:.4f} | {row['gradient_evaluations']:,} |"
            )
            if "below_start" in s:
                line += f" {s['below_start'][m]}/{n} |"
            lines.append(line)
        ci = s["ev3_minus_best"]
        lines += [
            "",
            f"EV3 − best alternative ({s['best_alternative']}): {ci['mean']:+.4f} "
            f"[{ci['low']:+.4f}, {ci['high']:+.4f}], **{s['verdict']}**.",
            "",
        ]
    lines += [
        "| scenario | variants | EV3 − best alternative (95% CI) | verdict |",
        "|---|---|---|---|",
    ]
    for g, s in out["groups"].items():
        if s:
            ci = s["ev3_minus_best"]
            lines.append(
                f"| ({g}) | {', '.join(s['variants'])} | {ci['mean']:+.4f} "
                f"[{ci['low']:+.4f}, {ci['high']:+.4f}] | {s['verdict']} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plot
def plot(results: dict[str, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = {"ev3": "C0", "grid": "C1", "random": "C2", "pbt": "C3", "plain": "C7"}
    for ax, name in zip(axes.flat, names):
        res = results[name]
        for m in METHODS:
            if m not in res["methods"]:
                continue
            r = res["methods"][m]
            ax.plot(
                r["curve_x"], r["curve"], "-", color=colors[m], label=m, lw=1.5 if m == "ev3" else 1
            )
        if "start_test" in res:
            ax.axhline(
                statistics.fmean(res["start_test"]), color="k", ls=":", lw=0.8, label="start"
            )
        if "teacher_test" in res:
            ax.axhline(
                statistics.fmean(res["teacher_test"]),
                color="gray",
                ls="--",
                lw=0.8,
                label="teacher",
            )
        ci = res["summary"]["ev3_minus_best"]
        ax.set_title(
            f"{name}\nEV3 - best: {ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]",
            fontsize=8,
        )
        ax.set_xlabel("total gradient evaluations", fontsize=8)
        ax.set_ylabel(f"test {res['metric']} (mean over seeds)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        lo = min(min(r["curve"][1:] or r["curve"]) for r in res["methods"].values())
        hi = max(max(r["curve"]) for r in res["methods"].values())
        ax.set_ylim(max(0.0, lo - 0.02), min(1.0, hi + 0.02))
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def budgets(quick: bool) -> dict[str, Budget]:
    # Distillation: two passes of K = 10 then 14 candidates; iterations a multiple of 10 make
    # EV3's total a whole number of trajectories per grid configuration.
    if quick:
        return {"label": Budget(5, 4), "digits": Budget(5, 10), "mnist1d": Budget(5, 10)}
    return {"label": Budget(50, 20), "digits": Budget(50, 20), "mnist1d": Budget(25, 40)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write every per-seed figure to this file")
    parser.add_argument("--plot", default="docs/value.png", help="the figure ('' for none)")
    parser.add_argument("--seeds", type=int, default=None, help="default 10 (--quick: 2)")
    parser.add_argument("--quick", action="store_true", help="two seeds, tiny budgets")
    parser.add_argument("--markdown", help="also write the tables as Markdown to this file")
    parser.add_argument(
        "--merge",
        nargs="+",
        help="JSON files of runs of disjoint scenario sets (e.g. run in parallel) to combine",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(n for g in GROUPS.values() for n in g),
        help="comma-separated scenario names",
    )
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds first-seed, first-seed+1, ... (development seeds: 100)",
    )
    parser.add_argument(
        "--relabel",
        type=float,
        default=None,
        help="development option: add ev3core.Relabel(THRESHOLD) to the label-noise grid",
    )
    parser.add_argument(
        "--distill-at-cap",
        action="store_true",
        help="development option: in scenario (a), EV3 starts from the cap-size student and "
        "does not grow",
    )
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="NAME=L,T",
        help="development option: trajectory length L and iterations T of a budget "
        "(label, digits or mnist1d); repeatable",
    )
    parser.add_argument(
        "--distill-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="development option: in scenario (a), set a field of EV3's DistillConfig "
        "(e.g. passes=1; a Python literal); repeatable",
    )
    parser.add_argument(
        "--decide-alpha",
        type=float,
        default=None,
        help="development option: EV3's decide_alpha in scenarios (b) and (c)",
    )
    args = parser.parse_args(argv)
    n_seeds = args.seeds if args.seeds is not None else (2 if args.quick else 10)
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    b = budgets(args.quick)
    for item in args.budget:
        bname, _, lt = item.partition("=")
        try:
            b[bname] = Budget(*(int(v) for v in lt.split(",")))
        except (TypeError, ValueError):
            parser.error(f"--budget {item!r}: expected NAME=L,T with NAME one of {sorted(b)}")
        if bname not in budgets(args.quick):
            parser.error(f"--budget {item!r}: NAME is one of {sorted(budgets(args.quick))}")
    overrides = {}
    for item in args.distill_set:
        field, sep, value = item.partition("=")
        if not sep or field not in {f.name for f in dataclasses.fields(DistillConfig)}:
            parser.error(f"--distill-set {item!r}: expected FIELD=VALUE with a DistillConfig field")
        overrides[field] = ast.literal_eval(value)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    parts: list[dict[str, Any]] = []
    for path in args.merge or []:
        with open(path) as f:
            part = json.load(f)
        # a `.partial` file (written after each scenario) has the scenarios only
        parts.append(
            {"file": path} | {k: part.get(k) for k in ("command", "budgets", "wall_seconds")}
        )
        for name, res in part["scenarios"].items():
            results[name] = res
            print_table(name, res, log)
    for name in [] if args.merge else args.scenarios.split(","):
        if name.startswith("distill"):
            ds = name.split("_")[1]
            res = run_distill_scenario(
                ds, seeds, b[ds], args.quick, log, args.distill_at_cap, overrides
            )
        else:
            res = run_label_scenario(
                name, seeds, b["label"], log, relabel=args.relabel, alpha=args.decide_alpha
            )
        res["summary"] = summarise(res)
        results[name] = res
        print_table(name, res, log)
        log(f"  ({res['wall_seconds']:.0f} s; {time.perf_counter() - t0:.0f} s so far)")
        if args.json:  # keep what is done if a later scenario fails
            with open(args.json + ".partial", "w") as f:
                json.dump({"scenarios": results}, f)
    groups = {g: group_summary(results, names) for g, names in GROUPS.items()}
    log("\n== scenarios ==")
    for g, s in groups.items():
        if s:
            ci = s["ev3_minus_best"]
            log(
                f"  ({g}) {', '.join(s['variants'])}: EV3 - best alternative {ci['mean']:+.4f} "
                f"[{ci['low']:+.4f}, {ci['high']:+.4f}] -> {s['verdict']}"
            )
    verdicts = [s["verdict"] for s in groups.values() if s]
    targets = {
        "scenarios_won": sum(v == "win" for v in verdicts),
        "scenarios_lost": sum(v == "loss" for v in verdicts),
        "won_at_least_two_lost_none": sum(v == "win" for v in verdicts) >= 2
        and "loss" not in verdicts,
        "ev3_never_below_start_pretrained_noise": all(
            results[n]["summary"]["below_start"]["ev3"] == 0
            for n in results
            if n.endswith("pretrained")
        ),
    }
    log(f"  targets: {targets}")
    out = {
        "benchmark": "value",
        "command": " ".join(
            ["python", "benchmarks/value.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "compute": (
            "gradient evaluations = optimizer steps of batch "
            f"{BATCH}, counted for every candidate, member and configuration"
        ),
        "budgets": {k: dataclasses.asdict(v) for k, v in b.items()},
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
        },
        "scenarios": results,
        "parts": parts,
        "groups": groups,
        "targets": targets,
        "wall_seconds": time.perf_counter() - t0,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(out) + "\n")
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
