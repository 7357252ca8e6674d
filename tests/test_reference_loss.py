"""Reference losses: a loss that also sees the engine's current (accepted) model.

`GradientProposer` hands every step of an iteration the current model as the reference,
while the trajectory itself may start elsewhere (a lineage that continues while rejected);
a plain call uses the model itself (bootstrapping on its own predictions)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ev3core


class Pull(ev3core.AbstractReferenceLoss):
    """Half the squared distance from the reference's weights: one SGD step of rate 1 lands
    on the reference exactly, so the test can see which model the reference was."""

    @property
    def label(self):
        return type(self).__name__

    def with_reference(self, model, reference, batch, key):
        del batch, key
        diff = jax.tree.map(
            lambda a, b: a - jax.lax.stop_gradient(b),
            eqx.filter(model, eqx.is_array),
            eqx.filter(reference, eqx.is_array),
        )
        return 0.5 * sum(jnp.sum(d**2) for d in jax.tree.leaves(diff))


def _problem():
    x = jax.random.normal(jax.random.key(0), (32, 3))
    y = (x[:, 0] > 0).astype(jnp.int32)
    model = eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(1))
    params, static = eqx.partition(model, eqx.is_array)
    return (x, y), params, static


def _moved(params, by):
    return jax.tree.map(lambda p: p + by, params)


def test_the_reference_is_the_current_model_not_the_lineage_start():
    data, current, static = _problem()
    lineage_start = _moved(current, 1.0)
    prop = ev3core.GradientProposer(
        [Pull()], [optax.sgd(0.5)], steps=1, batch_size=4, on_reject="continue"
    )
    # Lineages continue from where they were (here: `lineage_start`), not from `current`.
    state = prop.init(lineage_start, static, jax.random.key(2))
    cands, _ = prop.propose(current, static, state, data, jax.random.key(3))
    # One step of rate 0.5 towards the reference: half-way from the lineage to the current model.
    expected = _moved(current, 0.5)
    for got, want in zip(jax.tree.leaves(cands), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-6)


def test_a_plain_call_is_its_own_reference():
    data, params, static = _problem()
    model = eqx.combine(params, static)
    grads = eqx.filter_grad(lambda m: Pull()(m, data, jax.random.key(0)))(model)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


def test_self_distill_targets():
    data, params, static = _problem()
    model = eqx.combine(params, static)
    other = eqx.combine(_moved(params, 0.3), static)
    key = jax.random.key(0)
    # weight 0: cross-entropy on the labels
    np.testing.assert_allclose(
        ev3core.SelfDistill(weight=0.0)(model, data, key),
        ev3core.CrossEntropy()(model, data, key),
        rtol=1e-6,
    )
    # weight 1 against another model: cross-entropy against that model's predictions
    logits, ref = jax.vmap(model)(data[0]), jax.vmap(other)(data[0])
    want = jnp.mean(optax.softmax_cross_entropy(logits, jax.nn.softmax(ref / 2.0)))
    got = ev3core.SelfDistill(weight=1.0, temperature=2.0).with_reference(model, other, data, key)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # weight 1 against itself at temperature 1: the gradient vanishes (its own soft targets)
    grads = eqx.filter_grad(lambda m: ev3core.SelfDistill(weight=1.0)(m, data, key))(model)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-6
    # the gradient flows through the student only
    g_other = eqx.filter_grad(
        lambda m: ev3core.SelfDistill(weight=1.0).with_reference(m, other, data, key)
    )(model)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_other)) > 1e-4
    assert ev3core.SelfDistill(0.8).label == "self(w=0.8)"


def test_relabel_keeps_plausible_labels_and_corrects_the_others():
    data, params, static = _problem()
    model = eqx.combine(params, static)
    other = eqx.combine(_moved(params, 0.3), static)
    key = jax.random.key(0)
    x, y = data
    logits, ref = jax.vmap(model)(x), jax.vmap(other)(x)
    p_label = jax.nn.softmax(ref)[jnp.arange(len(y)), y]
    threshold = float(jnp.median(p_label))  # about half the labels kept, half corrected
    keep = p_label >= threshold
    assert 0 < int(jnp.sum(keep)) < len(y)
    # by hand: the label where the reference gives it >= threshold, else its soft prediction
    target = jnp.where(keep[:, None], jax.nn.one_hot(y, 2), jax.nn.softmax(ref / 0.5))
    want = jnp.mean(optax.softmax_cross_entropy(logits, target))
    got = ev3core.Relabel(threshold, temperature=0.5).with_reference(model, other, data, key)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # threshold 0 keeps every label: cross-entropy
    np.testing.assert_allclose(
        ev3core.Relabel(0.0).with_reference(model, other, data, key),
        ev3core.CrossEntropy()(model, data, key),
        rtol=1e-6,
    )
    # on its own, the examples it disagrees with give no gradient: equal to cross-entropy on
    # the examples it keeps, scaled by their share
    own = jax.nn.softmax(logits)[jnp.arange(len(y)), y] >= threshold
    assert 0 < int(jnp.sum(own)) < len(y)
    sub = (x[own], y[own])
    g_relabel = eqx.filter_grad(lambda m: ev3core.Relabel(threshold)(m, data, key))(model)
    g_kept = eqx.filter_grad(
        lambda m: ev3core.CrossEntropy()(m, sub, key) * (sub[1].shape[0] / len(y))
    )(model)
    for a, b in zip(jax.tree.leaves(g_relabel), jax.tree.leaves(g_kept)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert ev3core.Relabel(0.3).label == "relabel(p>=0.3)"
