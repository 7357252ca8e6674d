"""Bad input: clear `ev3core.errors` before compilation, never a raw error from inside JAX."""

import logging
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

import ev3core
from ev3core._adapt.priorities import Objective
from ev3core.errors import (
    ConfigurationError,
    DuplicateComponentError,
    EV3Error,
    UnknownComponentError,
)

TRACE_LOG = "tracing the EV3 step"


def _plugins(*extra):
    return ev3core.load_plugins(extra=list(extra), autoload=False)


# Shared optax objects: equal engines share one compiled step (keeps the property test fast).
SGD, ADAM = optax.sgd(0.1), optax.adam(1e-2)


def _grad(**kw):
    args = dict(losses=[ev3core.CrossEntropy()], optimizers=[SGD], steps=2, batch_size=4)
    args.update(kw)
    return ev3core.GradientProposer(**args)


def _data(n=64, features=2, x_dtype=jnp.float32, y_dtype=jnp.int32):
    x = jax.random.normal(jax.random.key(0), (n, features)).astype(x_dtype)
    y = (jnp.sum(x, axis=-1) > 0).astype(y_dtype)
    return ev3core.Data(propose=(x, y), assess=(x, y), decide=(x, y))


def _model(in_size=2):
    return eqx.nn.MLP(in_size, 2, 4, 1, key=jax.random.key(1))


def _engine(**kw):
    args = dict(
        proposers=[_grad()],
        assessors=["accuracy"],
        scheduler="ev3",
        assess_size=8,
        decide_size=16,
        plugins=_plugins(),
    )
    args.update(kw)
    return ev3core.Pipeline(**args).build()


# ------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("kind", "bad", "good"),
    [
        ("proposers", "gradiant", "gradient"),
        ("assessors", "acuracy", "accuracy"),
        ("scheduler", "ev33", "ev3"),
    ],
)
def test_unknown_component_names_suggest_close_matches(kind, bad, good):
    spec = [bad] if kind != "scheduler" else bad
    with pytest.raises(UnknownComponentError) as err:
        _engine(**{kind: spec})
    msg = str(err.value)
    assert repr(bad) in msg and f"Did you mean {good!r}" in msg and "ev3 plugins" in msg


def test_duplicate_component_names_are_refused():
    with pytest.raises(ConfigurationError, match=r"share the objective name\(s\) \['accuracy'\]"):
        _engine(assessors=["accuracy", ev3core.Accuracy()])

    class Twin:
        @ev3core.hookimpl
        def ev3_register_assessors(self):
            return {"accuracy": ev3core.NegCrossEntropy}

    strict = ev3core.load_plugins(extra=[Twin()], autoload=False, raise_errors=True)
    with pytest.raises(DuplicateComponentError) as err:
        strict.get("assessor", "accuracy")
    assert "'accuracy' is registered twice" in str(err.value)
    assert "ev3core.builtins" in str(err.value) and "Twin" in str(err.value)


# ------------------------------------------------------------------------- data vs model
@pytest.mark.parametrize(
    ("data", "model", "needles"),
    [
        (
            _data(features=3),
            _model(2),
            ["assessor #0 'accuracy'", "Data.assess", "float32[64, 3]", "do not match"],
        ),
        (_data(x_dtype=jnp.int32), _model(2), ["assessor #0 'accuracy'", "int32[64, 2]", "dtype"]),
        (_data(y_dtype=jnp.float32), _model(2), ["Data.assess", "float32[64]"]),
    ],
)
def test_data_that_does_not_fit_the_model_fails_before_compilation(data, model, needles, caplog):
    engine = _engine()
    state = engine.init(model, jax.random.key(2))
    with caplog.at_level(logging.INFO, logger="ev3core"), pytest.raises(ConfigurationError) as err:
        ev3core.run(engine, state, data, 1, plugins=_plugins())
    for needle in needles:
        assert needle in str(err.value)
    assert not [r for r in caplog.records if TRACE_LOG in r.getMessage()]  # never traced


def test_a_propose_stream_that_does_not_fit_names_the_proposer(caplog):
    engine = _engine()
    good, bad = _data(), _data(features=5)
    data = ev3core.Data(propose=bad.propose, assess=good.assess, decide=good.decide)
    state = engine.init(_model(), jax.random.key(2))
    with (
        caplog.at_level(logging.INFO, logger="ev3core"),
        pytest.raises(
            ConfigurationError,
            match=r"proposer #0 \(GradientProposer\).*"
            r"Data\.propose \(float32\[64, 5\]",
        ),
    ):
        ev3core.run(engine, state, data, 1, plugins=_plugins())
    assert not [r for r in caplog.records if TRACE_LOG in r.getMessage()]


def test_malformed_streams_and_a_foreign_state_are_refused():
    engine = _engine()
    state = engine.init(_model(), jax.random.key(2))
    x = jnp.zeros((10, 2))
    ragged = ev3core.Data(propose=(x, jnp.zeros((9,), jnp.int32)), assess=(x,), decide=(x,))
    with pytest.raises(ConfigurationError, match="same leading example axis"):
        engine.check_data(ragged, state)
    with pytest.raises(ConfigurationError, match="Data.assess is empty"):
        engine.check_data(ev3core.Data(propose=(x,), assess=(), decide=(x,)), state)
    other = _engine(assessors=["accuracy", "neg_cross_entropy"])
    with pytest.raises(ConfigurationError, match="made by another pipeline"):
        other.check_data(_data(), state)


# ------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("which", ["assess_alpha", "decide_alpha"])
def test_alpha_outside_zero_infinity_is_refused(which, value):
    with pytest.raises(ConfigurationError) as err:
        ev3core.EV3Scheduler(**{which: value})
    msg = str(err.value)
    assert "outside (0, inf)" in msg and repr(value) in msg and "positive finite" in msg


def test_assess_or_decide_sets_too_small_for_the_confidence_are_refused():
    engine = _engine(assess_size=8, decide_size=128)
    state = engine.init(_model(), jax.random.key(2))
    with pytest.raises(ConfigurationError) as err:
        ev3core.run(engine, state, _data(n=64), 1, plugins=_plugins())
    msg = str(err.value)
    assert "Data.decide holds 64 examples but decide_size=128" in msg
    assert "confidence" in msg and "decide_size<=64" in msg
    with pytest.raises(ConfigurationError, match="assess_size=1: at least 2 examples"):
        _engine(assess_size=1)


def test_empty_candidate_sets_are_refused():
    with pytest.raises(ConfigurationError, match="no proposer"):
        _engine(proposers=[])

    class Nothing(ev3core.AbstractProposer):
        @property
        def num_candidates(self):
            return 0

        def labels(self):
            return ()

        def adapt(self, state, outcome):
            return state

        def init(self, params, static, key):
            return None

        def propose(self, params, static, state, data, key):
            raise AssertionError("never called")

    with pytest.raises(ConfigurationError, match="Nothing proposes 0 candidates"):
        _engine(proposers=[Nothing()])
    with pytest.raises(ConfigurationError, match="GradientProposer got no losses"):
        _grad(losses=[])


def test_objectives_with_conflicting_directions_are_refused():
    two = ["accuracy", "neg_cross_entropy"]
    sched = ev3core.EV3Scheduler(objectives=[Objective("accuracy"), Objective("accuracy", "min")])
    with pytest.raises(ConfigurationError) as err:
        _engine(assessors=two, scheduler=sched)
    msg = str(err.value)
    assert "'accuracy' is given conflicting directions" in msg
    assert "direction='max'" in msg and "direction='min'" in msg

    swapped = ev3core.EV3Scheduler(
        objectives=[Objective("neg_cross_entropy"), Objective("accuracy")]
    )
    with pytest.raises(
        ConfigurationError,
        match=r"objectives\[0\] is named 'neg_cross_entropy' "
        r"but assessor #0 is 'accuracy'",
    ):
        _engine(assessors=two, scheduler=swapped)

    class Size(ev3core.AbstractAssessor):
        """Parameter count: better when lower, and says so."""

        direction = "min"

        @property
        def name(self):
            return "size"

        def __call__(self, model, batch):
            n = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
            return jnp.full(jax.tree.leaves(batch)[0].shape[0], n, jnp.float32)

    wrong_way = ev3core.EV3Scheduler(objectives=[Objective("accuracy"), Objective("size")])
    with pytest.raises(ConfigurationError, match=r"assessor #1 'size' declares direction='min'"):
        _engine(assessors=[ev3core.Accuracy(), Size()], scheduler=wrong_way)
    ok = ev3core.EV3Scheduler(objectives=[Objective("accuracy"), Objective("size", "min")])
    _engine(assessors=[ev3core.Accuracy(), Size()], scheduler=ok)  # consistent: fine


# ------------------------------------------------------------------------- property
# A valid configuration, then zero to two mutations that each make one thing invalid, so both
# outcomes (runs / refused) and their combinations are explored.
MUTATIONS = {
    "proposer_name": lambda c, d: c["proposers"].append(d(st.sampled_from(["gradiant", "noise"]))),
    "no_proposers": lambda c, d: c.update(proposers=[]),
    "proposer_args": lambda c, d: c["proposers"][0].update(
        d(
            st.sampled_from(
                [{"losses": 0}, {"optimizers": 0}, {"steps": -1}, {"steps": 0}, {"batch_size": 0}]
            )
        )
    ),
    "assessor_name": lambda c, d: c["assessors"].append("acuracy"),
    "no_assessors": lambda c, d: c.update(assessors=[]),
    "duplicate_assessor": lambda c, d: c["assessors"].append(c["assessors"][0]),
    "scheduler_name": lambda c, d: c.update(scheduler="evv3"),
    "alpha": lambda c, d: c.update(
        scheduler={
            "assess_alpha": d(st.sampled_from([0.5, 0.0, -1.0, math.inf, math.nan])),
            "decide_alpha": d(st.sampled_from([0.0, -2.0, math.inf, math.nan])),
            "objective": 0,
        }
    ),
    "objective": lambda c, d: c.update(
        scheduler={
            "assess_alpha": 0.5,
            "decide_alpha": 2.0,
            "objective": d(st.sampled_from([-1, len(c["assessors"])])),
        }
    ),
    "sizes": lambda c, d: c.update(
        d(st.sampled_from([{"assess_size": -1}, {"assess_size": 1}, {"decide_size": 0}]))
    ),
    "history": lambda c, d: c.update(history_size=0),
    "too_few_examples": lambda c, d: c.update(n=d(st.sampled_from([0, 1, 8]))),
    "ragged": lambda c, d: c.update(y_n="short"),
    "features": lambda c, d: c.update(features=3),
    "x_dtype": lambda c, d: c.update(x_dtype="int32"),
    "y_dtype": lambda c, d: c.update(y_dtype="float32"),
    "model_in": lambda c, d: c.update(model_in=3),
    "num_steps": lambda c, d: c.update(steps=-1),
    "chunk": lambda c, d: c.update(chunk=0),
}


@st.composite
def configurations(draw):
    # Little variety in the valid part: equal engines share one compiled step (fast test).
    proposer = st.fixed_dictionaries(
        {
            "losses": st.just(1),
            "optimizers": st.integers(1, 2),
            "steps": st.just(1),
            "batch_size": st.just(2),
        }
    )
    assessors = draw(st.permutations(["accuracy", "neg_cross_entropy"]))
    assessors = assessors[: draw(st.integers(1, 2))]
    cfg = {
        "proposers": [draw(proposer)],
        "assessors": list(assessors),
        "scheduler": draw(
            st.one_of(
                st.sampled_from(["ev3", "always_accept"]),
                st.fixed_dictionaries(
                    {
                        "assess_alpha": st.sampled_from([0.5, 2.0]),
                        "decide_alpha": st.sampled_from([1.0, 4.0]),
                        "objective": st.integers(0, len(assessors) - 1),
                    }
                ),
            )
        ),
        "assess_size": 8,
        "decide_size": 16,
        "history_size": draw(st.sampled_from([1, 4])),
        "n": draw(st.sampled_from([16, 64])),
        "y_n": "same",
        "features": 2,
        "x_dtype": "float32",
        "y_dtype": "int32",
        "model_in": 2,
        "steps": draw(st.sampled_from([0, 1, 2])),
        "chunk": draw(st.sampled_from([1, 2])),
    }
    mutations = draw(st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=2, unique=True))
    for m in mutations:
        MUTATIONS[m](cfg, draw)
    cfg["mutations"] = mutations
    return cfg


def _build_and_run(cfg):
    proposers = []
    for spec in cfg["proposers"]:
        if isinstance(spec, str):
            proposers.append(spec)
        else:
            proposers.append(
                ev3core.GradientProposer(
                    losses=[ev3core.CrossEntropy(t) for t in (1.0, 0.5)[: spec["losses"]]],
                    optimizers=[SGD, ADAM][: spec["optimizers"]],
                    steps=spec["steps"],
                    batch_size=spec["batch_size"],
                )
            )
    sched = cfg["scheduler"]
    if isinstance(sched, dict):
        sched = ev3core.EV3Scheduler(
            sched["assess_alpha"], sched["decide_alpha"], sched["objective"]
        )
    engine = ev3core.Pipeline(
        proposers,
        cfg["assessors"],
        sched,
        assess_size=cfg["assess_size"],
        decide_size=cfg["decide_size"],
        history_size=cfg["history_size"],
        plugins=_plugins(),
    ).build()
    n = cfg["n"]
    x = jax.random.normal(jax.random.key(0), (n, cfg["features"])).astype(cfg["x_dtype"])
    y = (jnp.arange(n) % 2).astype(cfg["y_dtype"])
    if cfg["y_n"] == "short":
        y = y[: max(n - 1, 0)]
    data = ev3core.Data(propose=(x, y), assess=(x, y), decide=(x, y))
    model = eqx.nn.MLP(cfg["model_in"], 2, 4, 1, key=jax.random.key(1))
    state = engine.init(model, jax.random.key(2))
    return ev3core.run(engine, state, data, cfg["steps"], plugins=_plugins(), chunk=cfg["chunk"])


@settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(configurations())
def test_any_configuration_runs_or_fails_with_an_ev3core_error(cfg):
    try:
        state, infos = _build_and_run(cfg)
    except EV3Error as exc:
        # Every library error is meant for a person: it says what to do.
        assert len(str(exc)) > 30
        event(f"refused: {type(exc).__name__}")
        return
    event("ran")
    assert not cfg["mutations"], f"{cfg['mutations']} should have been refused"
    assert int(state.step) == cfg["steps"]
    if cfg["steps"]:
        assert infos.winner.shape == (cfg["steps"],)


def test_the_property_covers_both_outcomes():
    """The strategy is not degenerate: some configurations run, some are refused."""
    ok = dict(
        proposers=[{"losses": 1, "optimizers": 1, "steps": 1, "batch_size": 2}],
        assessors=["accuracy"],
        scheduler="ev3",
        assess_size=8,
        decide_size=16,
        history_size=4,
        n=64,
        y_n="same",
        features=2,
        x_dtype="float32",
        y_dtype="int32",
        model_in=2,
        steps=1,
        chunk=1,
        mutations=[],
    )
    state, infos = _build_and_run(ok)
    assert int(state.step) == 1
    with pytest.raises(EV3Error):
        _build_and_run({**ok, "features": 3})
