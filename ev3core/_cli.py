"""The `ev3` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from .errors import EV3Error
from .hookspecs import hookimpl


class _Progress:
    """A lifecycle-hook plugin that prints a line every `every` steps."""

    def __init__(self, every: int, num_steps: int):
        self.every = max(1, every)
        self.num_steps = num_steps
        self.counts = {"accepted": 0, "rolled_back": 0, "kept": 0, "significant": 0}

    @hookimpl
    def ev3_after_step(self, info: Any, step: int) -> None:
        import numpy as np

        choice = int(info.choice)
        key = {0: "accepted", 1: "kept", 2: "rolled_back"}[choice]
        self.counts[key] += 1
        self.counts["significant"] += bool(info.significant)
        if (step + 1) % self.every == 0 or step + 1 == self.num_steps:
            acc = float(np.asarray(info.decide_mean)[0, choice])
            print(
                f"step {step + 1:>4}/{self.num_steps}  decide-acc {acc:.4f}  "
                f"accepted {self.counts['accepted']}  kept {self.counts['kept']}  "
                f"rolled back {self.counts['rolled_back']}  significant "
                f"{self.counts['significant']}",
                flush=True,
            )


def _cmd_run(args: argparse.Namespace) -> int:
    import jax

    from ._components import Accuracy
    from ._plugins import plugins as default_plugins
    from ._run import run
    from ._smoke import smoke_data, smoke_model, smoke_pipeline

    # Until a full experiment is installed, `ev3 run` runs the built-in smoke experiment.
    t0 = time.perf_counter()
    key = jax.random.key(args.seed)
    k_data, k_model, k_run = jax.random.split(key, 3)
    data, (x_test, y_test) = smoke_data(k_data)
    engine = smoke_pipeline().build()
    state = engine.init(smoke_model(k_model), k_run)
    plugins = default_plugins()
    progress = _Progress(args.print_every, args.steps)
    name = plugins.register(progress, name="ev3core.cli-progress")
    try:
        state, infos = run(engine, state, data, args.steps, plugins=plugins, chunk=args.chunk)
    finally:
        if name is not None:
            plugins.pm.unregister(name=name)
    test_acc = float(Accuracy()(state.model, (x_test, y_test)).mean())
    stable_acc = float(Accuracy()(state.stable_model, (x_test, y_test)).mean())
    summary = {
        "experiment": "smoke",
        "steps": args.steps,
        "seed": args.seed,
        "test_accuracy": test_acc,
        "stable_test_accuracy": stable_acc,
        **progress.counts,
        "wall_seconds": time.perf_counter() - t0,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from ._plugins import KINDS, plugins as default_plugins

    plugins = default_plugins()
    comps = {kind: plugins.components(kind) for kind in KINDS}
    entries = []
    for info in plugins.plugin_infos():
        entries.append(
            {
                "name": info.name,
                "distribution": info.distribution,
                "version": info.version,
                "hooks": list(info.hooks),
                "components": [
                    {"kind": kind, "name": c.name}
                    for kind in KINDS
                    for c in comps[kind].values()
                    if c.plugin == info.name
                ],
            }
        )
    failures = [
        {"name": f.name, "distribution": f.distribution, "stage": f.stage, "error": f.error}
        for f in plugins.failures
    ]
    if args.json:
        print(json.dumps({"plugins": entries, "failures": failures}, indent=2))
        return 0
    for e in entries:
        dist = f"{e['distribution']} {e['version']}" if e["distribution"] else "(no distribution)"
        print(f"{e['name']}  [{dist}]")
        print(f"  hooks: {', '.join(e['hooks'])}")
        for c in e["components"]:
            print(f"  {c['kind']}: {c['name']}")
    for f in failures:
        print(f"FAILED {f['name']} ({f['stage']}): {f['error']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ev3", description="EV3 meta-optimizer for JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run an EV3 experiment (default: the smoke experiment)")
    p_run.add_argument("--smoke", action="store_true", help="run the built-in smoke experiment")
    p_run.add_argument("--steps", type=int, default=30, help="EV3 iterations (default 30)")
    p_run.add_argument("--seed", type=int, default=0)
    p_run.add_argument("--chunk", type=int, default=1, help="steps per compiled call")
    p_run.add_argument("--print-every", type=int, default=5)
    p_run.add_argument("--json", help="also write the summary to this file")
    p_run.set_defaults(func=_cmd_run)
    p_pl = sub.add_parser("plugins", help="list loaded plugins and their components")
    p_pl.add_argument("--json", action="store_true")
    p_pl.set_defaults(func=_cmd_plugins)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EV3Error as exc:
        print(f"ev3: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
