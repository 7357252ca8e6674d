"""The outputs: `report.png`, the progress bar and JSON files written atomically."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import numpy as np

from ev3core._host.ckpt_format import state_digest

from ._config import DistillConfig
from ._data import Splits
from ._models import count_params, describe
from ._train import accuracy


def write_report(
    path: Path,
    metrics: list[dict[str, Any]],
    baseline_curve: list[tuple[int, float]],
    *,
    baseline_params: int | None,
    teacher_accuracy: float | None,
    title: str,
) -> None:
    """`report.png`: accuracy over gradient steps (EV3 and baseline, accepted / rejected /
    grown markers) and the student size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([m["gradient_steps"] for m in metrics])
    test = np.array([m["test_accuracy"] for m in metrics])
    params = np.array([m.get("student_params_after", m["student_params"]) for m in metrics])
    accepted = np.array([m["accepted"] for m in metrics], bool)
    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    ax.plot(steps, test, "-", color="C0", label="EV3 student (test)")
    ax.plot(steps[accepted], test[accepted], "^", color="green", ms=5, label="accepted")
    ax.plot(steps[~accepted], test[~accepted], "x", color="red", ms=5, label="rejected")
    if baseline_curve:
        b = np.array(baseline_curve)
        ax.plot(b[:, 0], b[:, 1], "-", color="C1", label="plain distillation (test)")
    if teacher_accuracy is not None:
        ax.axhline(teacher_accuracy, color="gray", ls=":", label="teacher (test)")
    grown = [m for m in metrics if m["grown"]]
    for i, m in enumerate(grown):
        for a in (ax, ax2):
            a.axvline(
                m["gradient_steps"],
                color="purple",
                ls="--",
                lw=0.8,
                label="grown" if (i == 0 and a is ax) else None,
            )
    ax.set_ylabel("test accuracy")
    lo = min(float(test.min()), *(b for _, b in baseline_curve)) if baseline_curve else test.min()
    ax.set_ylim(max(0.0, lo - 0.02), 1.0)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax2.step(steps, params, where="post", color="C0", label="EV3 student")
    if baseline_params is not None:
        ax2.axhline(baseline_params, color="C1", ls="-", label="baseline student")
    ax2.set_ylabel("parameters")
    ax2.set_xlabel("gradient steps (budget: one trajectory per EV3 iteration)")
    ax2.legend(loc="lower right", fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _Bar:
    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc="EV3 distill",
                unit="it",
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def __call__(self, row: dict[str, Any], counts: dict[str, int]) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(
            {
                "grad_steps": row["gradient_steps"],
                "acc": f"{row['decide_accuracy_full']:.3f}",
                "params": row.get("student_params_after", row["student_params"]),
                "acc/rej": f"{counts['accepted']}/{counts['kept'] + counts['rolled_back']}",
                "grown": counts["grown"],
            },
            refresh=False,
        )
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _summary(
    result: Any,
    splits: Splits,
    cfg: DistillConfig,
    teacher_info: dict[str, Any],
    baseline: dict[str, Any] | None,
    *,
    ev3_acc: float,
    ev3_seconds: float,
) -> dict[str, Any]:
    final = result.state.model
    K = result.engine.num_candidates
    budget = cfg.steps * cfg.trajectory
    summary = {
        "experiment": "cifar" if cfg.dataset == "cifar" else "distill",
        "dataset": cfg.dataset if cfg.data is None else splits.name,
        "data": cfg.data,
        "seed": cfg.seed,
        "splits": splits.sizes(),
        "ev3_iterations": cfg.steps,
        "gradient_steps": budget,
        "budget": (
            f"{budget} gradient steps = {cfg.steps} EV3 iterations x {cfg.trajectory}: each "
            "iteration advances every candidate lineage by one trajectory, so no EV3 student "
            "took more steps along its own lineage; the baseline gets the same number of "
            "optimizer steps. The EV3 student's own lineage took at most "
            f"{result.path_steps} of them; all {K} candidates together explored "
            f"{result.gradient_evaluations}."
        ),
        "ev3_path_steps": result.path_steps,
        "ev3_gradient_evaluations": result.gradient_evaluations,
        "teacher": {k: v for k, v in teacher_info.items()},
        "ev3_student": {
            "test_accuracy": ev3_acc,
            "stable_test_accuracy": accuracy(
                result.state.stable_model, splits.test.x, splits.test.y
            ),
            "params": count_params(final),
            "architecture": describe(final),
            "start_params": result.start_params,
            "start_test_accuracy": result.start_test_accuracy,
            "candidates_per_iteration": K,
            "counts": result.counts,
            "growth": result.growth,
            "archive": result.archive.summary(),
            "state_sha256": state_digest(result.state),
            "wall_seconds": result.metrics[-1]["wall_seconds"] if result.metrics else ev3_seconds,
        },
        "baseline_student": None
        if baseline is None
        else {k: v for k, v in baseline.items() if k != "curve"},
        "checkpoint": "checkpoint",
        "resumed_from": result.resumed_from,
    }
    return summary


def write_outputs(
    out: Path,
    result: Any,
    splits: Splits,
    cfg: DistillConfig,
    *,
    teacher_info: dict[str, Any],
    baseline: dict[str, Any] | None,
    baseline_curve: list[tuple[int, float]],
    ev3_seconds: float,
    started: float,
) -> dict[str, Any]:
    """Write `metrics.jsonl`, `student.eqx`, `summary.json` and `report.png`; returns the
    summary (with `out`)."""
    final = result.state.model
    ev3_acc = accuracy(final, splits.test.x, splits.test.y)
    with open(out / "metrics.jsonl", "w") as f:
        for row in result.metrics:
            f.write(json.dumps(row) + "\n")
    eqx.tree_serialise_leaves(out / "student.eqx", final)
    summary = _summary(
        result, splits, cfg, teacher_info, baseline, ev3_acc=ev3_acc, ev3_seconds=ev3_seconds
    )
    summary["wall_seconds"] = time.perf_counter() - started
    _write_json(out / "summary.json", summary)
    teacher_acc = teacher_info["test_accuracy"]
    write_report(
        out / "report.png",
        result.metrics,
        baseline_curve,
        baseline_params=None if baseline is None else baseline["params"],
        teacher_accuracy=teacher_acc,
        title=f"EV3 distillation on {splits.name} (seed {cfg.seed}): EV3 {ev3_acc:.3f}"
        + ("" if baseline is None else f", baseline {baseline['test_accuracy']:.3f}")
        + ("" if teacher_acc is None else f", teacher {teacher_acc:.3f}"),
    )
    summary["out"] = str(out)
    return summary
