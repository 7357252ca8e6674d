"""Write `docs/api.md`: the signature and docstring of every public name, as Markdown.

The page is committed, so it reads the same on GitHub, in an editor and on the site; run
`python docs/gen_api.py` after changing a public docstring or signature
(`tests/test_api_doc.py` fails while the committed page is out of date).

It covers everything in `ev3core.__all__` (grouped below; a name in no group lands under
"Other"), the exceptions of `ev3core.errors`, the hooks of `ev3core.hookspecs` and the
conformance kit `ev3core.testing`.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "api.md"

GROUPS: dict[str, tuple[str, ...]] = {
    "Pipelines and the engine": ("Pipeline", "Engine", "run", "toy_problem", "toy_model"),
    "Engine state and step results": (
        *("Data", "State", "StepInfo", "History", "Decision", "Outcome"),
        *("Choice", "choice_index", "choice_at", "WINNER", "CURRENT", "STABLE"),
    ),
    "Stage interfaces": (
        *("AbstractProposer", "AbstractAssessor", "AbstractBatchAssessor"),
        *("AbstractScheduler", "AbstractLoss", "AbstractReferenceLoss", "ComponentName"),
        "objective_value",
    ),
    "Models": ("Stateful", "TrainingView", "batch_apply", "MixedPrecision"),
    "Proposers": ("GradientProposer", "GradientProposerState"),
    "Assessors and losses": (
        *("Accuracy", "NegCrossEntropy", "NegBrierScore", "F1Score", "AUC"),
        *("NegExpectedCalibrationError", "CrossEntropy", "SelfDistill", "Relabel"),
    ),
    "Schedulers": ("EV3Scheduler", "EV3SchedulerState", "AlwaysAccept"),
    "Confidence bounds": (
        *("AbstractBound", "Interval", "NormalBound", "PairedBound", "BootstrapBound"),
        *("z_for_level", "level_for_z"),
    ),
    "Objectives and priorities": (
        *("Objective", "Constraint", "Feedback", "AbstractPriority", "Lexicographic"),
        *("WeightedSum", "WeightedChebyshev", "StallPriority", "UCBPriority", "EXP3Priority"),
    ),
    "Plugins": ("plugin_manager", "load_plugins", "Plugins", "make", "hookimpl"),
    "Observability": ("ProgressBar", "JsonlLogger", "step_record"),
    "Checkpoints": (
        *("Checkpointer", "save_checkpoint", "load_checkpoint", "latest_checkpoint"),
        "list_checkpoints",
    ),
    "Distributed runs": ("candidate_mesh", "replicate", "shard_state"),
}
_MODULES = ("errors", "hookspecs")  # documented in sections of their own


def _doc(obj: Any) -> str:
    """The docstring, dedented; its code examples as `py` blocks (the docs test runs every
    `python` block of docs/*.md, and these are illustrations, not complete programs)."""
    doc = inspect.getdoc(obj) or ""
    return re.sub(r"^```python$", "```py", doc, flags=re.M)


def _annotation(a: Any) -> str:
    return a if isinstance(a, str) else inspect.formatannotation(a)


def _param(p: inspect.Parameter) -> str:
    text = p.name
    if p.kind is p.VAR_POSITIONAL:
        text = "*" + text
    elif p.kind is p.VAR_KEYWORD:
        text = "**" + text
    if p.annotation is not p.empty:
        text += f": {_annotation(p.annotation)}"
    if p.default is not p.empty:
        text += f" = {p.default!r}" if p.annotation is not p.empty else f"={p.default!r}"
    return text


def _signature(name: str, obj: Any) -> str | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = [_param(p) for p in sig.parameters.values()]
    kinds = [p.kind for p in sig.parameters.values()]
    for i, kind in enumerate(kinds):  # the `/` and `*` markers
        if kind is inspect.Parameter.KEYWORD_ONLY and inspect.Parameter.VAR_POSITIONAL not in kinds:
            params.insert(i, "*")
            break
    if inspect.Parameter.POSITIONAL_ONLY in kinds:
        last = max(i for i, k in enumerate(kinds) if k is inspect.Parameter.POSITIONAL_ONLY)
        params.insert(last + 1, "/")
    ret = sig.return_annotation
    ret = "" if ret is inspect.Signature.empty else f" -> {_annotation(ret)}"
    # a function default prints with its address; keep its name so the page is reproducible
    params = [re.sub(r"<function (\S+) at 0x[0-9a-f]+>", r"\1", p) for p in params]
    text = f"{name}({', '.join(params)}){ret}"
    if len(text) > 90:  # one parameter a line
        text = f"{name}(\n" + "".join(f"    {p},\n" for p in params) + f"){ret}"
    return text


def _own_members(cls: type) -> list[tuple[str, Any]]:
    """Public methods and properties defined by `cls` itself, with docstrings."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property) or inspect.isfunction(value):
            if (value.__doc__ or "").strip():
                out.append((name, value))
    return out


def _entry(qualname: str, obj: Any, level: int = 3) -> str:
    short = qualname.rsplit(".", 1)[-1]
    kind = (
        "class"
        if inspect.isclass(obj)
        else "function"
        if callable(obj)
        else f"constant `= {obj!r}`"
    )
    lines = [f'<a id="{qualname}"></a>', "", f"{'#' * level} `{short}`", "", f"*{kind}*", ""]
    sig = _signature(short, obj) if callable(obj) else None
    if sig:
        lines += ["```py", sig, "```", ""]
    doc = _doc(obj) if (callable(obj) or inspect.ismodule(obj)) else ""
    if doc:
        lines += [doc, ""]
    if inspect.isclass(obj):
        for name, member in _own_members(obj):
            lines += [f'<a id="{qualname}.{name}"></a>', "", f"**`{short}.{name}`**", ""]
            if isinstance(member, property):
                lines += ["*property*", ""]
            else:
                lines += ["```py", _signature(name, member) or name, "```", ""]
            lines += [_doc(member), ""]
    return "\n".join(lines)


def _module_section(title: str, module: types.ModuleType, names: list[str]) -> list[str]:
    lines = [f'<a id="{module.__name__}"></a>', "", f"## {title}", "", _doc(module), ""]
    for name in names:
        lines.append(_entry(f"{module.__name__}.{name}", getattr(module, name)))
    return lines


def render() -> str:
    import ev3core
    import ev3core.testing as testing
    from ev3core import errors, hookspecs

    public = [n for n in ev3core.__all__ if n not in _MODULES]
    grouped = {n for names in GROUPS.values() for n in names}
    groups = dict(GROUPS)
    other = tuple(n for n in public if n not in grouped)
    if other:
        groups["Other"] = other
    lines = [
        "# API reference",
        "",
        "<!-- Generated by docs/gen_api.py from the docstrings; do not edit by hand. -->",
        "",
        "Every public name of `ev3core` (its `__all__`; the implementation lives in private",
        "modules), the exceptions of `ev3core.errors`, the hook specifications",
        "(`ev3core.hookspecs`; see also [the hook lifecycle](hooks.md)) and the conformance",
        "kit `ev3core.testing`, with their signatures and docstrings.",
        "",
    ]
    for title, names in groups.items():
        lines += [f"## {title}", ""]
        for name in names:
            if name in ev3core.__all__:
                lines.append(_entry(f"ev3core.{name}", getattr(ev3core, name)))
    error_names = [
        n
        for n, v in vars(errors).items()
        if inspect.isclass(v) and issubclass(v, Exception) and v.__module__ == errors.__name__
    ]
    lines += _module_section("Errors (`ev3core.errors`)", errors, error_names)
    lines += _module_section(
        "Hook specifications (`ev3core.hookspecs`)", hookspecs, hookspecs._all_hook_names()
    )
    lines += _module_section(
        "Conformance kit (`ev3core.testing`)", testing, sorted(testing.__all__, key=str.lower)
    )
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"
    return text.replace(str(Path.cwd()), ".")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/api.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT} is out of date: run `python docs/gen_api.py`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
