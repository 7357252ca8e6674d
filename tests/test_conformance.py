"""The conformance kit (`ev3core.testing`): it catches broken components with a message that
names the component, the check and the fix, and every registered first-party component
(built-ins and the installed `plugins/*` packages, found through the plugin registry) passes
it. The template plugin is also installed for real with pip and found through its entry point.
"""

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import ev3core
import ev3core.testing as et

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- broken components
class _Noise(ev3core.AbstractProposer):
    """A correct proposer; the broken ones below change one thing each."""

    scale: jax.Array = eqx.field(converter=jnp.asarray, default=0.1)

    @property
    def num_candidates(self) -> int:
        return 2

    def labels(self):
        return ("a", "b")

    def adapt(self, state, outcome):
        return state

    def init(self, params, static, key):
        return None

    def _noise(self, params, key, scale):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(
            treedef,
            [
                x[None] + (scale * jax.random.normal(k, (2,) + x.shape)).astype(x.dtype)
                for x, k in zip(leaves, keys)
            ],
        )

    def propose(self, params, static, state, data, key):
        return self._noise(params, key, self.scale), state


_CALLS = itertools.count()


class _CountingProposer(_Noise):
    """Impure: a Python-side call counter leaks into the candidates."""

    def propose(self, params, static, state, data, key):
        shift = 1e-3 * next(_CALLS)
        cands = self._noise(params, key, self.scale)
        return jax.tree.map(lambda x: x + shift, cands), state


class _FixedKeyProposer(_Noise):
    """Ignores its key: always the same 'random' candidates."""

    def propose(self, params, static, state, data, key):
        return self._noise(params, jax.random.key(0), self.scale), state


class _StaticFloatProposer(_Noise):
    """Its scale is a static Python float: every new value recompiles."""

    scale: float = eqx.field(static=True, default=0.1)


class _StaticIntProposer(_Noise):
    """Its scale (in thousandths) is a static int: changing it recompiles."""

    scale: int = eqx.field(static=True, default=100)

    def propose(self, params, static, state, data, key):
        return self._noise(params, key, self.scale / 1000), state


class _Count(eqx.Module):
    calls: int = eqx.field(static=True)


class _LeakyStateProposer(_Noise):
    """Keeps a counter in a static field of its state: lost by a checkpoint."""

    def init(self, params, static, key):
        return _Count(0)

    def propose(self, params, static, state, data, key):
        return self._noise(params, key, self.scale), _Count(state.calls + 1)


class _UnstackedProposer(_Noise):
    """Returns the parameters without the candidate axis."""

    def propose(self, params, static, state, data, key):
        return params, state


class _MeanAccuracy(ev3core.AbstractAssessor):
    """Returns one number per batch instead of one per example."""

    direction = "max"  # higher scores are better

    @property
    def name(self):
        return "mean_accuracy"

    def __call__(self, model, batch):
        x, y = batch
        return jnp.mean((jnp.argmax(jax.vmap(model)(x), -1) == y).astype(jnp.float32))


class _CrossEntropyScore(ev3core.AbstractAssessor):
    """Lower is better: the cross-entropy itself, not its negation."""

    direction = "max"  # higher scores are better

    @property
    def name(self):
        return "cross_entropy"

    def __call__(self, model, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(model)(x), y)


class _Wrapped(ev3core.AbstractScheduler):
    """A scheduler that wraps `AlwaysAccept` (final built-ins are wrapped, not subclassed)."""

    inner: ev3core.AlwaysAccept = ev3core.AlwaysAccept()

    def bind(self, assessors):
        return self

    def init(self, num_objectives, key):
        return self.inner.init(num_objectives, key)

    def select(self, scores, valid, state, history):
        return self.inner.select(scores, valid, state, history)

    def decide(self, scores, winner_valid, state, history):
        return self.inner.decide(scores, winner_valid, state, history)


class _ArgminScheduler(_Wrapped):
    """Lower is better: picks the lowest-scoring candidate."""

    def select(self, scores, valid, state, history):
        mean = jnp.mean(scores[0, : valid.shape[0]], axis=-1)
        return jnp.argmin(jnp.where(valid, mean, jnp.inf)).astype(jnp.int32)


class _BlindScheduler(_Wrapped):
    """Ignores the validity mask."""

    def select(self, scores, valid, state, history):
        return jnp.argmax(jnp.mean(scores[0, : valid.shape[0]], axis=-1)).astype(jnp.int32)

    def decide(self, scores, winner_valid, state, history):
        return self.inner.decide(scores, jnp.asarray(True), state, history)


class _NegatedLoss(ev3core.AbstractLoss):
    """A 'loss' that is higher for better models (wraps `CrossEntropy`)."""

    inner: ev3core.CrossEntropy = ev3core.CrossEntropy()

    @property
    def label(self):
        return type(self).__name__

    def __call__(self, model, batch, key):
        return -self.inner(model, batch, key)


BROKEN = [
    pytest.param(
        et.check_proposer,
        _CountingProposer(),
        {"checks": ("pure",)},
        "'pure' check: two calls of propose with the same inputs",
        id="python-counter",
    ),
    pytest.param(
        et.check_proposer,
        _FixedKeyProposer(),
        {"checks": ("pure",)},
        "ignores its `key`",
        id="fixed-key",
    ),
    pytest.param(
        et.check_proposer,
        _StaticFloatProposer(),
        {"checks": ("no_recompile",)},
        "the field(s) ['scale'] hold Python floats",
        id="static-float",
    ),
    pytest.param(
        et.check_proposer,
        _StaticIntProposer(),
        {"checks": ("no_recompile",), "variants": [_StaticIntProposer(scale=50)]},
        "re-traced the compiled function 1 more time(s) (its static",
        id="static-int",
    ),
    pytest.param(
        et.check_proposer,
        _LeakyStateProposer(),
        {"checks": ("checkpoint",)},
        "not the same after save_checkpoint / load_checkpoint",
        id="state-not-round-tripping",
    ),
    pytest.param(
        et.check_proposer,
        _UnstackedProposer(),
        {"checks": ("structure",)},
        "expected the parameters stacked 2 times",
        id="unstacked-candidates",
    ),
    pytest.param(
        et.check_assessor,
        _MeanAccuracy(),
        {"checks": ("structure",)},
        "of shape () and dtype float32 for a batch of 32 examples",
        id="assessor-shape",
    ),
    pytest.param(
        et.check_assessor,
        _CrossEntropyScore(),
        {"checks": ("convention",)},
        "scores must be higher-is-better",
        id="assessor-lower-is-better",
    ),
    pytest.param(
        et.check_scheduler,
        _ArgminScheduler(),
        {"checks": ("convention",), "safe": False},
        "scores are higher-is-better",
        id="scheduler-lower-is-better",
    ),
    pytest.param(
        et.check_scheduler,
        _BlindScheduler(),
        {"checks": ("nonfinite",), "safe": False},
        "select returned the invalid candidate 1",
        id="scheduler-ignores-validity",
    ),
    pytest.param(
        et.check_loss,
        _NegatedLoss(),
        {"checks": ("convention",)},
        "a loss is lower-is-better",
        id="loss-higher-is-better",
    ),
]


@pytest.mark.parametrize("check, component, options, expected", BROKEN)
def test_the_kit_catches_a_broken_component(check, component, options, expected):
    with pytest.raises(et.ConformanceError) as err:
        check(component, **options)
    msg = str(err.value)
    assert expected in msg
    assert type(component).__qualname__ in msg  # names the component
    assert "Fix:" in msg  # and says what to do
    assert isinstance(err.value, AssertionError)  # pytest reports it as a failure


def test_the_kit_passes_a_correct_component_and_reports_what_ran():
    report = et.check_proposer(_Noise())
    assert set(report) == set(et.CHECKS) - {"convention"}
    # what did not run says why: a proposer has no score direction
    assert list(report.not_applicable) == ["convention"]
    assert "score direction" in report.not_applicable["convention"]


def test_a_check_that_does_not_apply_fails_loudly_when_asked_for():
    with pytest.raises(et.NotApplicableError, match="'convention' check does not apply"):
        et.check_proposer(_Noise(), checks=("convention",))
    # an assessor has no state: no checkpoint to round-trip
    with pytest.raises(et.NotApplicableError, match="no state"):
        et.check_assessor(ev3core.Accuracy(), checks=("checkpoint",))
    # no array hyperparameters and nothing to rebuild: the reason names both fixes
    with pytest.raises(et.NotApplicableError, match="variants=.*rebuild="):
        et.check_assessor(ev3core.Accuracy(), checks=("no_recompile",))


class _Float32Step(_Noise):
    """Adds a float32 step to every leaf: fine for float32 models, a promotion error (or a
    silent upcast) for bfloat16 ones."""

    scale: jax.Array = eqx.field(converter=lambda x: jnp.asarray(x, jnp.float32), default=0.1)

    def propose(self, params, static, state, data, key):
        return jax.tree.map(lambda x: jnp.stack([x, x]) + self.scale, params), state


class _Float32Score(ev3core.AbstractAssessor):
    """Scores that are finite for float32 and bfloat16 models but overflow in float16 (its
    largest value is 65504)."""

    direction = "max"  # higher scores are better

    @property
    def name(self):
        return "exp_logit"

    def __call__(self, model, batch):
        x, _ = batch
        return -((jnp.max(jax.vmap(model)(x), axis=-1) * 1e3) ** 2)


def test_the_dtype_check_runs_components_on_low_precision_models():
    with pytest.raises(et.ConformanceError, match="'dtype' check.*bfloat16"):
        et.check_proposer(_Float32Step(), checks=("dtype",))
    with pytest.raises(et.ConformanceError, match="'dtype' check.*non-finite.*float16"):
        et.check_assessor(_Float32Score(), checks=("dtype",))
    assert et.check_assessor(ev3core.NegCrossEntropy(), checks=("dtype",)) == ("dtype",)


class _OptaxProposer(_Noise):
    """Holds an optax optimizer: its learning rate is a constant inside the closures."""

    opt: optax.GradientTransformation = eqx.field(static=True, default=None)

    def __init__(self, lr=0.1):
        self.scale = jnp.asarray(0.1)
        self.opt = optax.sgd(lr)


def test_no_recompile_sees_constants_captured_in_optax_closures():
    with pytest.raises(et.ConformanceError, match="capture Python floats in their closures"):
        et.check_proposer(_OptaxProposer(), checks=("no_recompile",))


class _Rebuilt(_Noise):
    """Equal settings, but a new function object per build (a static closure)."""

    fn: Any = eqx.field(static=True, default=None)

    def __init__(self):
        self.scale = jnp.asarray(0.1)
        self.fn = lambda x: x


def test_no_recompile_rebuilds_the_component_from_equal_settings():
    with pytest.raises(et.ConformanceError, match="built again from the same settings re-traced"):
        et.check_proposer(_Rebuilt(), rebuild=_Rebuilt, checks=("no_recompile",))
    # an equal rebuild (and a changed array hyperparameter) reuses the compiled program
    assert et.check_proposer(_Noise(), rebuild=_Noise, checks=("no_recompile",))


class _Stateful(eqx.Module):
    calls: int = eqx.field(static=True)


class _UniformPriority(ev3core.AbstractPriority):
    """Equal weights, weighted-sum utility, no state (the ones below change one thing)."""

    scalarisation = "sum"

    def init(self, num_objectives):
        return None

    def priorities(self, state, history, key):
        n = history.score.shape[-1]
        return jnp.full((n,), 1.0 / n, jnp.float32)

    def utility(self, values, weights):
        return jnp.sum(weights * values)

    def update(self, state, feedback, history):
        return state

    def lexicographic_order(self, num_objectives):
        return None


class _StaticStatePriority(_UniformPriority):
    """Counts updates in a static field: lost by a checkpoint."""

    def init(self, num_objectives):
        return _Stateful(0)

    def update(self, state, feedback, history):
        return _Stateful(state.calls + 1)


class _LowerIsBetterPriority(_UniformPriority):
    def utility(self, values, weights):
        return -jnp.sum(weights * values)


def test_priority_checkpoint_and_convention_checks():
    with pytest.raises(et.ConformanceError, match="'checkpoint' check"):
        et.check_priority(_StaticStatePriority(), checks=("checkpoint",))
    with pytest.raises(et.ConformanceError, match="'convention' check.*higher-is-better"):
        et.check_priority(_LowerIsBetterPriority(), checks=("convention",))
    report = et.check_priority(ev3core.WeightedSum([0.5, 0.5]))
    assert {"convention", "checkpoint"} <= set(report)
    assert set(report.not_applicable) == {"dtype", "nonfinite"}


def test_a_broken_component_fails_the_default_run_too():
    with pytest.raises(et.ConformanceError, match="re-traced|Python floats"):
        et.check(_StaticFloatProposer())


# --------------------------------------------------------------------------- the registry
class _NeedsArgs(_Noise):
    scale: jax.Array = eqx.field(converter=jnp.asarray)  # no default: cls() fails


class _ArgsPlugin:
    @ev3core.hookimpl
    def ev3_register_proposers(self):
        return {"needs_args": _NeedsArgs}


class _ExamplesPlugin:
    @ev3core.hookimpl
    def ev3_conformance_examples(self, kind, name, cls):
        if cls is _NeedsArgs:
            quick = ("structure",)
            return [
                et.Example(_NeedsArgs(0.2), checks=quick),
                et.Example(_NeedsArgs(0.3), checks=quick),
            ]
        return None


def test_a_component_needing_arguments_must_get_examples_from_its_plugin():
    bare = ev3core.load_plugins(extra=[_ArgsPlugin()], autoload=False)
    [example] = et.examples("proposer", "needs_args", bare)
    with pytest.raises(et.ConformanceError, match="ev3_conformance_examples") as err:
        et.check_example("proposer", example)
    assert "needs_args" in str(err.value) and "_ArgsPlugin" in str(err.value)

    given = ev3core.load_plugins(extra=[_ArgsPlugin(), _ExamplesPlugin()], autoload=False)
    found = et.examples("proposer", "needs_args", given)
    assert [float(e.component.scale) for e in found] == pytest.approx([0.2, 0.3])
    assert et.check_registered("proposer", "needs_args", given)  # both examples pass


class _FirstPartyExamples:
    """Examples for first-party components whose defaults do not fit the kit's problem."""

    @ev3core.hookimpl
    def ev3_conformance_examples(self, kind, name, cls):
        if kind == "loss" and f"{cls.__module__}.{cls.__name__}".startswith("ev3_distill"):
            if cls.__name__ == "DistillLoss":  # default: precomputed teacher logits
                teacher = et.default_problem().good_model
                return [cls(temperature=2.0, weight=0.5, teacher_fn=teacher)]
        return None


PLUGINS = ev3core.load_plugins(extra=[_FirstPartyExamples()], autoload=True)
CASES = et.registered_examples(PLUGINS)


def test_every_kind_and_first_party_plugin_is_covered():
    plugins = {PLUGINS.components(kind)[name].plugin for kind, name, _ in CASES}
    assert "ev3core.builtins" in plugins
    kinds = {kind for kind, _, _ in CASES}
    assert kinds == set(et.KINDS)
    names = {(kind, name) for kind, name, _ in CASES}
    assert ("assessor", "f1") in names and ("scheduler", "always_accept") in names
    assert ("proposer", "signum") in names  # the template, installed through its entry point


def _engine_level(kind, example):
    """Proposers and assessors are run in a real engine together (one compile) by the test
    below."""
    return (
        kind in ("proposer", "assessor")
        and "problem" not in example.options
        and "nonfinite" in (example.options.get("checks", et.CHECKS))
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[2].label)
def test_registered_component_conforms(case):
    kind, _, example = case
    if example.error is None and _engine_level(kind, example):
        # the engine-level check runs in the test below; what never applies to the kind
        # stays out of an explicit list (asking for it would raise NotApplicableError)
        never = {"proposer": {"convention"}, "assessor": {"checkpoint"}}[kind] | {"nonfinite"}
        checks = example.options.get("checks", et.CHECKS)
        options = {**example.options, "checks": [c for c in checks if c not in never]}
        example, rebuild = et.Example(example.component, **options), example.rebuild
        example.rebuild = rebuild  # the registry's rebuild, for the no_recompile check
    ran = et.check_example(kind, example)
    assert {"structure", "jit", "pure", "no_recompile"} <= set(ran)


def test_registered_proposers_and_assessors_together_in_one_engine():
    def engine_level(kind):
        return [
            ex.component
            for k, _, ex in CASES
            if k == kind and ex.error is None and _engine_level(k, ex)
        ]

    proposers, assessors = engine_level("proposer"), engine_level("assessor")
    assert len(proposers) >= 3  # the built-in and the template's, at least
    assert len(assessors) >= 4
    assert set(et.check_engine(proposers, assessors)) == {"jit", "nonfinite", "checkpoint"}


# --------------------------------------------------------------------------- a real install
def test_template_installs_with_pip_and_passes_the_kit(tmp_path, pip_install_target):
    """`pip install` the template into a fresh target directory; a new interpreter finds it
    through its entry point and its assessor passes the kit."""
    target = pip_install_target(tmp_path / "site", ROOT / "plugins" / "ev3-template")
    assert (target / "ev3_template" / "plugin.py").is_file()
    code = textwrap.dedent(
        """
        import ev3core, ev3core.testing as et
        p = ev3core.load_plugins(only=["template"])
        info = p.components("assessor")["top_k"]
        import ev3_template
        print(info.plugin, info.cls.__module__, ev3_template.__file__)
        print(et.check_registered("assessor", "top_k", p))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EV3_")}
    env["PYTHONPATH"] = str(target)
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.splitlines()[-2:]
    plugin, module, path = first.split()
    assert plugin == "template" and module == "ev3_template._components"
    assert path.startswith(str(target))  # the installed copy, not the source tree
    assert "'convention'" in second and "'pure'" in second
