"""The ev3-evosax plugin package: gradient-free proposers built on evosax.

The plugin is installed (editable) by the Makefile like every `plugins/*` package; these tests
use it through its entry point. The main test optimises a model whose gradient is zero
everywhere (a perceptron with a sign activation), where gradient proposers cannot move.
"""

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_digits

import ev3core
import ev3core.testing as et
from ev3core.errors import ConfigurationError

ev3_evosax = pytest.importorskip("ev3_evosax")  # installed by `make setup`
from ev3_evosax import EvosaxProposer, EvosaxState, cma_es, open_es, sep_cma_es  # noqa: E402


class SignPerceptron(eqx.Module):
    """Binary classifier `sign(w.x + b)`: its gradient is zero wherever it is defined."""

    w: jax.Array
    b: jax.Array

    def __call__(self, x):
        s = jnp.sign(x @ self.w + self.b)
        return jnp.stack([-s, s])  # logits of classes 0 and 1


@pytest.fixture(scope="module")
def plugins():
    return ev3core.load_plugins(only=["evosax"], raise_errors=True)


@pytest.fixture(scope="module")
def digits():
    """Digits 0-4 vs 5-9, split into the three EV3 streams and a held-out test set."""
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(x))
    x = jnp.asarray(x[perm] / 16.0, jnp.float32)
    y = jnp.asarray(y[perm] >= 5, jnp.int32)
    data = ev3core.Data(
        propose=(x[:800], y[:800]),
        assess=(x[800:1100], y[800:1100]),
        decide=(x[1100:1400], y[1100:1400]),
    )
    return data, (x[1400:], y[1400:])


def _model():
    return SignPerceptron(0.01 * jax.random.normal(jax.random.key(0), (64,)), jnp.zeros(()))


def _accuracy(model, test):
    return float(ev3core.Accuracy()(model, test).mean())


def _same(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------ discovery
def test_found_through_entry_point(plugins):
    info = {p.name: p for p in plugins.plugin_infos()}["evosax"]
    assert info.distribution == "ev3-evosax"
    assert info.version == ev3_evosax.__version__
    assert {"ev3_register_proposers", "ev3_explore", "ev3_conformance_examples"} <= set(info.hooks)
    comps = plugins.components("proposer")
    # One final class; open_es, sep_cma_es and cma_es are factories that build it.
    assert comps["evosax"].cls is EvosaxProposer and comps["evosax"].plugin == "evosax"
    assert not {"open_es", "sep_cma_es", "cma_es"} & set(comps)
    # ... and the default plugin set (all installed entry points) lists it too.
    assert ev3core.plugin_manager().components("proposer")["evosax"].cls is EvosaxProposer
    assert not [f for f in plugins.failures if f.name == "evosax"]
    made = plugins.make("proposer", "evosax", strategy="Sep_CMA_ES", popsize=6)
    assert isinstance(made, EvosaxProposer) and made.num_candidates == 7
    for factory, strategy in [(open_es, "Open_ES"), (sep_cma_es, "Sep_CMA_ES"), (cma_es, "CMA_ES")]:
        built = factory(popsize=4)
        assert type(built) is EvosaxProposer and built.strategy == strategy
        assert built.labels()[0] == f"{factory.__name__}:mean"
    assert float(open_es(4).learning_rate) == pytest.approx(0.05)  # OpenAI-ES's own default


def test_fitness_defaults_to_the_pipelines_first_assessor(plugins, builtin_plugins):
    engine = ev3core.Pipeline(
        [open_es(4), open_es(4, fitness=ev3core.Accuracy())],
        assessors=["neg_cross_entropy", "accuracy"],
        plugins=plugins,
    ).build()
    assert isinstance(engine.proposers[0].fitness, ev3core.NegCrossEntropy)
    assert isinstance(engine.proposers[1].fitness, ev3core.Accuracy)  # explicit wins
    # Without the plugin's hook (plugin not loaded), fitness stays None: accuracy is used.
    bare = ev3core.Pipeline([open_es(4)], plugins=ev3core.load_plugins(autoload=False)).build()
    assert bare.proposers[0].fitness is None


def test_configuration_errors_name_the_fix():
    with pytest.raises(ConfigurationError, match="Did you mean 'Open_ES'"):
        EvosaxProposer("OpenES")
    with pytest.raises(ConfigurationError, match="even"):
        open_es(popsize=5)
    with pytest.raises(ConfigurationError, match="not parameters of CMA_ES"):
        cma_es(es_params={"learning_rate": 0.1})
    with pytest.raises(ConfigurationError, match="has no optimizer"):
        EvosaxProposer("Sep_CMA_ES", learning_rate=0.1)
    with pytest.raises(ConfigurationError, match="recenter"):
        sep_cma_es(recenter="sometimes")


# ------------------------------------------------------------------ the ES in the state
def test_sigma_and_learning_rate_are_array_leaves(digits):
    data, _ = digits
    params, static = eqx.partition(_model(), eqx.is_array)
    prop = open_es(popsize=8, sigma=0.1, learning_rate=0.0, batch_size=32)
    state = prop.init(params, static, jax.random.key(0))
    assert isinstance(state, EvosaxState)
    propose = eqx.filter_jit(
        eqx.debug.assert_max_traces(lambda p, *args: p.propose(*args), max_traces=1)
    )
    key = jax.random.key(1)
    out = {}
    for sigma, lr in [(0.1, 0.0), (1.0, 0.0), (0.1, 0.5)]:
        p = eqx.tree_at(
            lambda p: (p.sigma, p.learning_rate), prop, (jnp.float32(sigma), jnp.float32(lr))
        )
        out[sigma, lr] = propose(p, params, static, state, data.propose, key)
    flat0, _ = ravel_pytree(params)

    def members(cands):
        return jax.vmap(lambda c: ravel_pytree(c)[0])(cands)

    small, big = members(out[0.1, 0.0][0]), members(out[1.0, 0.0][0])
    # Candidate 0 is the ES mean; with learning rate 0 it has not moved.
    np.testing.assert_array_equal(small[0], flat0)
    np.testing.assert_array_equal(big[0], flat0)
    # Same key, same noise: sigma scales the perturbations exactly.
    np.testing.assert_allclose(
        big[1:] - big[:1], 10 * (small[1:] - small[:1]), rtol=1e-4, atol=1e-6
    )
    # A positive learning rate moves the mean (the ES took a step on the propose batch).
    moved = members(out[0.1, 0.5][0])[0]
    assert float(jnp.abs(moved - flat0).max()) > 0.1
    # The fitness of the evaluated generation is recorded (accuracies, in [0, 1]).
    fit = out[0.1, 0.5][1].fitness
    assert fit.shape == (8,) and bool(jnp.all((fit >= 0) & (fit <= 1)))


@pytest.mark.parametrize("recenter", ["moved", "never"])
def test_es_mean_follows_the_current_model(recenter):
    params, static = eqx.partition(_model(), eqx.is_array)
    prop = sep_cma_es(popsize=4, recenter=recenter)
    state = prop.init(params, static, jax.random.key(0))
    elsewhere = jax.tree.map(lambda x: x + 1.0, params)
    mean0 = state.es.mean

    def outcome(p):
        return ev3core.Outcome(
            accepted_index=jnp.int32(-1),
            accepted=jnp.bool_(True),
            significant=jnp.bool_(False),
            params=p,
        )

    unmoved = prop.adapt(state, outcome(params))  # the current model did not change
    np.testing.assert_array_equal(unmoved.es.mean, mean0)
    moved = prop.adapt(state, outcome(elsewhere))  # another proposer's candidate accepted
    want = ravel_pytree(elsewhere)[0] if recenter == "moved" else mean0
    np.testing.assert_array_equal(moved.es.mean, want)


# ------------------------------------------------------------------ the worked example
def test_es_learns_where_gradients_cannot_and_compiles_once(plugins, digits):
    data, test = digits
    model = _model()
    start = _accuracy(model, test)
    gradient = ev3core.GradientProposer(
        [ev3core.CrossEntropy()],
        [optax.sgd(0.5), optax.sgd(0.05, momentum=0.9)],
        steps=5,
        batch_size=32,
    )
    scheduler = ev3core.EV3Scheduler(assess_alpha=0.5, decide_alpha=2.0)

    # Gradient proposers alone: the gradient is zero, every candidate is the current model.
    alone = ev3core.Pipeline(
        [gradient], ["accuracy"], scheduler, assess_size=256, decide_size=256, plugins=plugins
    ).build()
    s0 = alone.init(model, jax.random.key(1))
    s_alone, infos = alone.scan(s0, data, 60)
    K = alone.num_candidates
    np.testing.assert_array_equal(
        infos.assess_mean[:, 0, :K], np.repeat(infos.assess_mean[:, 0, K : K + 1], K, axis=1)
    )
    assert not bool(infos.accepted.any())
    assert _same(s_alone.current, s0.current)
    assert _accuracy(s_alone.model, test) == start

    # Gradient + OpenAI-ES candidates in one pipeline; sigma and the learning rate change
    # between chunks without re-tracing the step.
    es = open_es(popsize=16, sigma=0.1, learning_rate=0.1, generations=4, batch_size=128)
    mixed = ev3core.Pipeline(
        [gradient, es], ["accuracy"], scheduler, assess_size=256, decide_size=256, plugins=plugins
    ).build()
    assert mixed.labels()[:3] == ("p0:ce(T=1)|opt0", "p0:ce(T=1)|opt1", "p1:open_es:mean")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("ev3core")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    state, accepted, winners = mixed.init(model, jax.random.key(1)), 0, []
    try:
        for sigma, lr in [(0.1, 0.1), (0.05, 0.05), (0.05, 0.05)]:
            mixed = eqx.tree_at(
                lambda e: (e.proposers[1].sigma, e.proposers[1].learning_rate),
                mixed,
                (jnp.float32(sigma), jnp.float32(lr)),
            )
            state, infos = mixed.scan(state, data, 50)
            accepted += int(infos.accepted.sum())
            winners.extend(np.asarray(infos.winner)[np.asarray(infos.accepted)].tolist())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    traces = [r for r in records if "tracing the EV3 step" in r.getMessage()]
    assert len(traces) == 1
    final = _accuracy(state.model, test)
    # Held-out accuracy: +15 points on 397 test examples is far beyond luck (the gradient-only
    # run above does not change a single bit of the model).
    assert final >= start + 0.15, (start, final)
    assert accepted >= 3 and all(w >= K for w in winners)  # every accepted one is an ES one
    # The ES mean follows the accepted model.
    np.testing.assert_array_equal(state.proposer_states[1].anchor, ravel_pytree(state.current)[0])


# ------------------------------------------------------------------ conformance kit
def test_every_registered_proposer_gives_the_kit_an_example(plugins):
    """The conformance kit itself runs on these examples in tests/test_conformance.py (it is
    parametrised over every registered component of the installed plugins), so it is not
    repeated here: each full check of an evosax proposer costs 15-50 s of compilation."""
    examples = et.examples("proposer", "evosax", plugins)
    assert [e.component.strategy for e in examples] == ["Open_ES", "SNES", "Sep_CMA_ES", "CMA_ES"]
    for example in examples:
        assert example.error is None and isinstance(example.component, EvosaxProposer)
        checks = set(example.options.get("checks", et.CHECKS))
        assert {"structure", "jit", "pure", "no_recompile", "checkpoint"} <= checks
    assert "checks" not in examples[0].options  # OpenAI-ES: every check


def test_conformance_kit_quick():
    """The kit's cheapest checks, here too: candidate shapes, state structure, purity."""
    ran = et.check_proposer(sep_cma_es(popsize=4, batch_size=16), checks=["structure", "pure"])
    assert set(ran) == {"structure", "pure"}
