"""The conformance kit: checks that any proposer, assessor, scheduler, loss, bound or
priority keeps the engine's contract.

Modelled on optax's shared optimizer tests: one call per component runs every check and
raises `ConformanceError` (an `AssertionError`, so pytest reports it as a failure) naming the
component, the check that failed, what was wrong and how to fix it.

```python
import ev3core.testing as et

et.check(MyProposer(scale=0.1))                   # any component: dispatches on its kind
et.check_assessor(MyScore(), problem=my_problem)  # with your own model and data
```

The checks (pass `checks=(...)` to run a subset):

- `"structure"`: shapes and conventions (per-example scores of shape `(n,)`; candidates are
  the parameters stacked `num_candidates` times; states keep their structure, shapes and
  dtypes; decisions and priorities have the documented shapes).
- `"jit"`, `"vmap"`: it runs under `jax.jit` and under `jax.vmap`, with the same results.
- `"pure"`: the same inputs and key give bit-identical results, run after run (no Python-side
  counters, global RNGs or host state); a proposer also gives different candidates for a
  different key (pass `uses_key=False` for a deterministic one).
- `"no_recompile"`: changing its numeric hyperparameters (its inexact array leaves, or the
  `variants` you pass) reuses the compiled program; no hyperparameter is a Python float.
- `"convention"`: higher is better (an assessor scores the problem's good model above its
  bad model; a scheduler prefers and accepts clearly better models; a loss is lower for the
  good model).
- `"checkpoint"`: an engine `State` holding the component's state (after a step) survives
  `save_checkpoint` / `load_checkpoint` bit for bit, loaded with `like=` the state `init`
  returned.
- `"nonfinite"`: a proposer runs in a real `Engine` next to a proposer of NaN and Inf
  candidates and on NaN examples, and no non-finite candidate is ever accepted
  (`check_engine` does this for several components in one engine); a scheduler never selects
  or accepts an invalid candidate.

Registered components are checked with `check_registered(kind, name)` or, for a whole plugin
set, by parametrising a test over `registered_examples()`. A component whose constructor
needs arguments is given example instances by its plugin through the
`ev3_conformance_examples` hook (see `docs/writing-plugins.md`).
"""

from ._assessors import check_assessor as check_assessor
from ._bounds import check_bound as check_bound
from ._checker import (
    CHECKS as CHECKS,
    KINDS as KINDS,
    ConformanceError as ConformanceError,
    NotApplicableError as NotApplicableError,
    Report as Report,
)
from ._engine import check_engine as check_engine
from ._example import Example as Example
from ._losses import check_loss as check_loss
from ._priorities import check_priority as check_priority
from ._problem import Problem as Problem, default_problem as default_problem
from ._proposers import check_proposer as check_proposer
from ._registry import (
    check as check,
    check_example as check_example,
    check_registered as check_registered,
    examples as examples,
    registered_examples as registered_examples,
)
from ._schedulers import check_scheduler as check_scheduler

__all__ = [
    "CHECKS",
    "KINDS",
    "ConformanceError",
    "Example",
    "NotApplicableError",
    "Problem",
    "Report",
    "check",
    "check_assessor",
    "check_bound",
    "check_engine",
    "check_example",
    "check_loss",
    "check_priority",
    "check_proposer",
    "check_registered",
    "check_scheduler",
    "default_problem",
    "examples",
    "registered_examples",
]
