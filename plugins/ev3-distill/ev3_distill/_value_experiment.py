"""The `value` experiment: EV3 against what a user would do instead, at equal total compute.

`ev3 run --experiment value [--scenario NAME] [--seed N] [--out DIR]` runs one scenario of
`ev3_distill._scenarios` for one seed: EV3, grid and random search with early stopping on the
decide split, population-based training and plain training, each given the same number of
gradient evaluations. It prints each method's test metric with the compute it used, the
comparison of EV3 with the best alternative, and writes `summary.json` and `report.png`
(test metric against total gradient evaluations, every method) to `out`.

A single seed shows what happens; it is not evidence. `benchmarks/value.py` runs every
scenario over ten seeds with paired confidence intervals (see docs/value.md).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from ev3core.errors import ConfigurationError

from ._scenarios import SCENARIOS, run_label_scenario
from ._value import ALTERNATIVES, Budget

DEFAULT_SCENARIO = "noise_sym_scratch"
TRAJECTORY = 50  # gradient steps per candidate trajectory (PBT: steps between exploits)
ITERATIONS = 20  # EV3 iterations (PBT rounds; grid checkpoints)
_DESCRIPTION = {
    "noise_sym_scratch": "digits, 40% of the training labels replaced by another class, "
    "trained from scratch",
    "noise_sym_pretrained": "digits, 40% symmetric label noise, fine-tuning a model "
    "pretrained on clean labels",
    "noise_asym_scratch": "digits, 40% of the training labels flipped to a look-alike class, "
    "trained from scratch",
    "noise_asym_pretrained": "digits, 40% class-flip label noise, fine-tuning a model "
    "pretrained on clean labels",
    "imbalance_worst_class": "digits, class-imbalanced training split (10:1), selected and "
    "reported on worst-class accuracy (not differentiable)",
}
_LABEL = {
    "ev3": "EV3",
    "grid": "grid search + early stopping",
    "random": "random search + early stopping",
    "pbt": "population-based training",
    "plain": "plain training (all the compute)",
}


def _check(
    scenario: str,
    steps: int | None,
    dataset: str | None,
    pipeline: str | None,
    resume: Any,
    observers: Sequence[Any],
    extra: dict[str, Any],
) -> None:
    """Refuse what this experiment cannot honour, before any work."""
    if scenario not in SCENARIOS:
        raise ConfigurationError(
            f"--scenario {scenario!r} is not a value scenario. Choose one of: "
            f"{', '.join(SCENARIOS)}."
        )
    if steps is not None and steps < 1:
        raise ConfigurationError(f"--steps {steps}: EV3 needs at least one iteration.")
    if dataset not in (None, "digits"):
        raise ConfigurationError(
            f"--dataset {dataset}: the value scenarios are built on digits. Drop --dataset, "
            "or run `ev3 run --experiment distill --dataset NAME`."
        )
    if pipeline is not None:
        raise ConfigurationError(
            "the value experiment compares fixed, equal-compute configurations: it takes no "
            "pipeline file. Run `ev3 run --experiment distill PIPELINE.py` to bring your own."
        )
    if resume is not None:
        raise ConfigurationError(
            "the value experiment keeps no checkpoints (one scenario takes a few minutes): "
            "run it again instead of --resume."
        )
    if observers:
        raise ConfigurationError(
            "the value experiment runs EV3 as one compiled program per scenario: it has no "
            "per-step observers. Drop --observer / --log-jsonl."
        )
    unknown = sorted(k for k, v in extra.items() if v is not None)
    if unknown:
        raise ConfigurationError(
            f"the value experiment takes no {', '.join('--' + k for k in unknown)}: its "
            "options are --scenario, --seed, --steps and --out."
        )


def _summary(scenario: str, seed: int, res: dict[str, Any], t0: float) -> dict[str, Any]:
    """The scenario's summary for its one seed: every method's test metric and curve at
    equal compute, and EV3's difference to the best alternative."""
    metric = res["metric"]
    methods = {
        m: {
            "test": r["test"][0],
            "gradient_evaluations": r["gradient_evaluations"],
            "curve_x": r["curve_x"],
            "curve": r["curve"],
        }
        for m, r in res["methods"].items()
    }
    best = max(ALTERNATIVES, key=lambda m: methods[m]["test"])
    diff = methods["ev3"]["test"] - methods[best]["test"]
    summary = {
        "experiment": "value",
        "scenario": scenario,
        "description": _DESCRIPTION[scenario],
        "seed": seed,
        "metric": f"test {metric}",
        "start": res["start_test"][0],
        "methods": methods,
        "best_alternative": best,
        "ev3_minus_best_alternative": diff,
        "config": {m: r.get("config") for m, r in res["methods"].items()},
        "evidence": "one seed; benchmarks/value.py runs ten seeds with paired 95% intervals "
        "(docs/value.md)",
        "wall_seconds": time.perf_counter() - t0,
    }
    summary["compute"] = (
        f"every method used {methods['ev3']['gradient_evaluations']:,} gradient evaluations "
        "(optimizer steps on batches of 32, counted for every candidate, member and "
        "configuration)"
    )
    return summary


def value_experiment(
    *,
    scenario: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
    dataset: str | None = None,
    pipeline: str | None = None,
    resume: Any = None,
    observers: Sequence[Any] = (),
    checkpoint_every: int | None = None,  # accepted from the CLI; nothing is checkpointed
    keep: int | None = None,
    chunk: int | None = None,
    examples: int | None = None,
    print_every: int | None = None,
    data: str | None = None,
    teacher_logits: str | None = None,
    trajectory: int = TRAJECTORY,
) -> dict[str, Any]:
    """Run one value scenario for one seed and return its summary.

    **Arguments:**

    - `scenario`: one of `SCENARIOS` (default `"noise_sym_scratch"`).
    - `seed`: fixes the splits, the noise, the starting model and every method's randomness.
    - `steps`: EV3 iterations (default 20); every method gets
      `candidates * trajectory * steps` gradient evaluations.
    - `out`: a directory for `summary.json` and `report.png` (nothing is written without it).
    - `progress`: print the comparison on stderr.
    - `trajectory`: gradient steps per EV3 candidate trajectory, PBT's steps between exploits
      and the searches' checkpoint period (default 50).
    """
    del checkpoint_every, keep
    scenario = DEFAULT_SCENARIO if scenario is None else scenario
    _check(
        scenario,
        steps,
        dataset,
        pipeline,
        resume,
        observers,
        {
            "chunk": chunk,
            "examples": examples,
            "print-every": print_every,
            "data": data,
            "teacher-logits": teacher_logits,
        },
    )
    t0 = time.perf_counter()
    if trajectory < 1:
        raise ConfigurationError(f"trajectory={trajectory}: at least one gradient step.")
    budget = Budget(trajectory, ITERATIONS if steps is None else steps)

    def log(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    log(f"value scenario {scenario!r} (seed {seed}): {_DESCRIPTION[scenario]}")
    res = run_label_scenario(scenario, [seed], budget, log)
    summary = _summary(scenario, seed, res, t0)
    methods, best = summary["methods"], summary["best_alternative"]
    metric, diff = res["metric"], summary["ev3_minus_best_alternative"]
    log(f"\n{metric} on the test split (start {summary['start']:.3f}):")
    for m in ("ev3", *ALTERNATIVES):
        r = methods[m]
        log(f"  {_LABEL[m]:<34} {r['test']:.3f}   {r['gradient_evaluations']:>7,} grad. evals")
    log(
        f"EV3 - best alternative ({_LABEL[best]}): {diff:+.3f} at equal compute "
        "(one seed: see docs/value.md for ten)"
    )
    if out is not None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        _report(summary, os.path.join(out, "report.png"))
        summary["outputs"] = [
            os.path.join(str(out), "summary.json"),
            os.path.join(str(out), "report.png"),
        ]
    return summary


def _report(summary: dict[str, Any], path: str) -> None:
    """Test metric against total gradient evaluations, every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, r in summary["methods"].items():
        style = {"lw": 2.2} if m == "ev3" else {"lw": 1.2, "alpha": 0.85}
        ax.plot(r["curve_x"], r["curve"], label=f"{_LABEL[m]} ({r['test']:.3f})", **style)
    ax.axhline(summary["start"], color="gray", ls=":", lw=0.8, label="start")
    ax.set_xlabel("total gradient evaluations")
    ax.set_ylabel(summary["metric"])
    ax.set_title(
        f"{summary['scenario']} (seed {summary['seed']}): EV3 - best alternative "
        f"{summary['ev3_minus_best_alternative']:+.3f}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
