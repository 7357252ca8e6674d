"""Distillation benchmark: EV3 with growth vs plain distillation vs labels only.

For each data set (digits, MNIST-1D) and seed: split the data with the seed, train the teacher
(as `ev3 run` does), then train three students at an equal gradient-step budget and an equal
student size cap (MLP with two hidden layers of 32 units):

- `ev3`: EV3 distillation (`ev3_distill.run_ev3`, the `ev3 run` defaults): starts at one
  hidden layer of 8 units and grows, candidates over losses x optimizers, two passes,
  decisions on held-out log-likelihood under an accuracy constraint;
- `plain_kd`: one distillation loss (T = 4, weight 0.9), Adam, the student at the cap;
- `labels_only`: cross-entropy on the labels, Adam, the student at the cap.

Budget: `steps * trajectory` optimizer steps of batch 32 for every method. In each EV3
iteration every candidate lineage advances by one trajectory (`on_reject="continue"`: a
rejected candidate goes on from its own endpoint until the current model changes), so no
student EV3 can return took more than the budget along its own lineage
(`ev3_lineage_gradient_steps`: the final student's, an upper bound); all candidates together
explored K times more (`ev3_explored_gradient_steps`). The baselines are tuned
fairly: each seed picks Adam's learning rate from `LEARNING_RATES` by *decide*-split accuracy
(never the test split).

Reports mean and standard deviation over seeds of test accuracy, student parameters and wall
time, the EV3 student's starting accuracy per seed, and whether the targets hold (EV3's mean
test accuracy above both baselines; EV3 never below its own starting student, per seed).

```bash
.venv/bin/python benchmarks/distill.py --json benchmarks/distill.json
.venv/bin/python benchmarks/distill.py --seeds 2 --datasets digits --json /tmp/quick.json
```

Last measured: see `benchmarks/distill.json` and docs/distillation.md ("Benchmark").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import jax
from ev3_distill import (
    DistillConfig,
    count_params,
    load_dataset,
    run_baseline,
    run_ev3,
    train_teacher,
)
from ev3_distill._train import accuracy


def _stats(values: list[float]) -> dict[str, float | list[float]]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


LEARNING_RATES = (1e-3, 3e-3, 1e-2)


def _tuned_baseline(splits, teacher, cfg, key):
    """The baseline at its best learning rate, chosen on the *decide* split (never the test
    split) from `LEARNING_RATES`; returns (model, test accuracy, chosen lr, wall seconds)."""
    best = None
    t = time.perf_counter()
    for lr in LEARNING_RATES:
        c = dataclasses.replace(cfg, baseline_learning_rate=lr)
        model, curve = run_baseline(splits, teacher, c, key)
        dec = accuracy(model, splits.decide.x, splits.decide.y)
        if best is None or dec > best[0]:
            best = (dec, model, curve[-1][1], lr)
    _, model, test, lr = best
    return model, test, lr, (time.perf_counter() - t) / len(LEARNING_RATES)


def run_dataset(name: str, seeds: list[int], steps: int, log) -> dict:
    per: dict[str, dict[str, list[float]]] = {
        m: {"test_accuracy": [], "params": [], "wall_seconds": []}
        for m in ("ev3", "plain_kd", "labels_only")
    }
    teacher_acc, start_acc, grown, path_steps, explored = [], [], [], [], []
    counts, chosen_lr = [], {"plain_kd": [], "labels_only": []}
    for seed in seeds:
        cfg = DistillConfig(dataset=name, seed=seed, steps=steps)
        splits = load_dataset(name, seed)
        k_teacher, k_ev3, k_base = jax.random.split(jax.random.key(seed), 3)
        teacher = train_teacher(splits, k_teacher)
        teacher_acc.append(accuracy(teacher, splits.test.x, splits.test.y))

        t = time.perf_counter()
        res = run_ev3(splits, teacher, cfg, k_ev3)
        wall = time.perf_counter() - t
        model = res.state.model
        per["ev3"]["test_accuracy"].append(accuracy(model, splits.test.x, splits.test.y))
        per["ev3"]["params"].append(count_params(model))
        per["ev3"]["wall_seconds"].append(wall)
        start_acc.append(res.start_test_accuracy)
        grown.append(len(res.growth))
        path_steps.append(res.path_steps)
        explored.append(res.gradient_evaluations)
        counts.append(res.counts)

        for method, t_model in (("plain_kd", teacher), ("labels_only", None)):
            model, test, lr, wall = _tuned_baseline(splits, t_model, cfg, k_base)
            per[method]["test_accuracy"].append(test)
            per[method]["params"].append(count_params(model))
            per[method]["wall_seconds"].append(wall)
            chosen_lr[method].append(lr)
        log(
            f"{name} seed {seed}: teacher {teacher_acc[-1]:.4f}  "
            + "  ".join(f"{m} {per[m]['test_accuracy'][-1]:.4f}" for m in per)
            + f"  (EV3 from {start_acc[-1]:.4f}, grew {grown[-1]}x to "
            f"{per['ev3']['params'][-1]} params, {counts[-1]['accepted']} accepted, lineage "
            f"{path_steps[-1]} of {steps * cfg.trajectory} steps; baseline lr "
            f"{chosen_lr['plain_kd'][-1]:g} / {chosen_lr['labels_only'][-1]:g})"
        )
    methods = {m: {k: _stats(v) for k, v in d.items()} for m, d in per.items()}
    ev3_mean = methods["ev3"]["test_accuracy"]["mean"]
    return {
        "seeds": seeds,
        "teacher_test_accuracy": _stats(teacher_acc),
        "ev3_start_test_accuracy": _stats(start_acc),
        "ev3_per_seed_vs_start": [
            {"seed": s, "start": a0, "final": a1, "not_below_start": a1 >= a0}
            for s, a0, a1 in zip(seeds, start_acc, per["ev3"]["test_accuracy"])
        ],
        "ev3_growth_events": grown,
        "ev3_counts": counts,
        "ev3_lineage_gradient_steps": _stats([float(x) for x in path_steps]),
        "ev3_explored_gradient_steps": _stats([float(x) for x in explored]),
        "baseline_learning_rates_chosen_on_decide": chosen_lr,
        "methods": methods,
        "targets": {
            "ev3_mean_above_plain_kd": ev3_mean > methods["plain_kd"]["test_accuracy"]["mean"],
            "ev3_mean_above_labels_only": ev3_mean
            > methods["labels_only"]["test_accuracy"]["mean"],
            "ev3_never_below_its_start": all(
                a >= s for a, s in zip(per["ev3"]["test_accuracy"], start_acc)
            ),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--datasets", default="digits,mnist1d")
    parser.add_argument(
        "--steps",
        type=int,
        default=DistillConfig.steps,
        help="EV3 iterations (x trajectory = gradient steps)",
    )
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    cfg = DistillConfig(steps=args.steps)
    out = {
        "benchmark": "distill",
        "command": " ".join(["python", "benchmarks/distill.py", *(argv or sys.argv[1:])]),
        "budget": {
            "ev3_iterations": args.steps,
            "gradient_steps": args.steps * cfg.trajectory,
            "definition": (
                "Every method gets `gradient_steps` = EV3 iterations x trajectory optimizer "
                "steps of batch 32. In each EV3 iteration every candidate lineage advances by "
                "one trajectory (on_reject='continue': a lineage goes on from its own endpoint "
                "until the current model changes), so no model EV3 can return has taken more "
                "than `gradient_steps` steps along its own lineage; the final student's lineage "
                "took `ev3_lineage_gradient_steps` of them (an upper bound), and all K "
                "candidates together `ev3_explored_gradient_steps`, K times more. The "
                "baselines get the same number of steps on one fixed-size student, at the "
                f"learning rate of {list(LEARNING_RATES)} with the best decide-split accuracy."
            ),
            "batch_size": cfg.batch_size,
            "student_cap_widths": list(cfg.cap_widths),
        },
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        },
        "datasets": {},
    }
    for name in args.datasets.split(","):
        out["datasets"][name] = run_dataset(name, list(range(args.seeds)), args.steps, log)
    out["wall_seconds"] = time.perf_counter() - t0
    for name, res in out["datasets"].items():
        for m, d in res["methods"].items():
            acc = d["test_accuracy"]
            log(
                f"{name:8s} {m:12s} test accuracy {acc['mean']:.4f} +- {acc['sd']:.4f}  "
                f"params {d['params']['mean']:.0f}  wall {d['wall_seconds']['mean']:.1f} s"
            )
        log(f"{name:8s} targets {res['targets']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
