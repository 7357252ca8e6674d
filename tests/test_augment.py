"""Augmentation components (one example, a key) and their use on the propose stream."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ev3core as ev3
from ev3core.errors import ConfigurationError


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(0), (64, 6, 5, 3)) + 1.0  # never equal to 0


def _keys(n, seed=1):
    return jax.random.split(jax.random.key(seed), n)


def test_random_crop_is_a_window_of_the_padded_image(images):
    crop = ev3.RandomCrop(2)
    out = jax.jit(jax.vmap(crop))(images, _keys(len(images)))
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
    offsets = set()
    for x, y in zip(padded, np.asarray(out)):
        hits = [
            (i, j) for i in range(5) for j in range(5) if np.array_equal(x[i : i + 6, j : j + 5], y)
        ]
        assert hits, "the crop is not a window of the zero-padded image"
        offsets.add(hits[0])
    assert len(offsets) > 5  # the offsets really are random
    same = jax.vmap(crop)(images, _keys(len(images)))
    assert bool(jnp.all(same == out))  # deterministic under the keys
    assert bool(jnp.all(jax.vmap(ev3.RandomCrop(0))(images, _keys(len(images))) == images))


def test_horizontal_flip(images):
    k = _keys(len(images))
    always = jax.vmap(ev3.HorizontalFlip(1.0))(images, k)
    assert bool(jnp.all(always == images[:, :, ::-1, :]))
    assert bool(jnp.all(jax.vmap(ev3.HorizontalFlip(0.0))(images, k) == images))
    half = jax.vmap(ev3.HorizontalFlip())(images, k)
    flipped = jnp.all(half == images[:, :, ::-1, :], axis=(1, 2, 3))
    kept = jnp.all(half == images, axis=(1, 2, 3))
    assert bool(jnp.all(flipped | kept))
    assert 10 < int(flipped.sum()) < 54
    with pytest.raises(ConfigurationError, match="Reshaped"):
        ev3.HorizontalFlip()(images[0, 0], k[0])  # not an image


def test_shift1d_moves_the_signal_and_fills():
    x = jnp.arange(1.0, 21.0)
    shift = ev3.Shift1D(3, fill=-1.0)
    seen = set()
    for k in _keys(40):
        y = np.asarray(shift(x, k))
        s = [s for s in range(-3, 4) if np.array_equal(y, _shifted(np.asarray(x), s, -1.0))]
        assert len(s) == 1
        seen.add(s[0])
    assert len(seen) >= 5
    two = jnp.stack([x, -x], axis=1)  # (length, channels)
    y2 = shift(two, _keys(1)[0])
    assert y2.shape == two.shape and bool(jnp.all(y2[:, 0] == shift(x, _keys(1)[0])))


def _shifted(x, s, fill):
    out = np.full_like(x, fill)
    if s >= 0:
        out[s:] = x[: len(x) - s]
    else:
        out[:s] = x[-s:]
    return out


def test_compose_and_reshaped(images):
    k = _keys(len(images))
    twice = ev3.Compose([ev3.HorizontalFlip(1.0), ev3.HorizontalFlip(1.0)])
    assert bool(jnp.all(jax.vmap(twice)(images, k) == images))
    flat = jnp.reshape(images, (len(images), -1))
    out = jax.vmap(ev3.Reshaped(ev3.HorizontalFlip(1.0), (6, 5, 3)))(flat, k)
    assert bool(jnp.all(out == jnp.reshape(images[:, :, ::-1], (len(images), -1))))
    with pytest.raises(ConfigurationError, match="AbstractAugment"):
        ev3.Compose([lambda x, k: x])


def test_augment_batch_touches_only_the_inputs(images):
    y = jnp.arange(len(images))
    x2, y2 = ev3.augment_batch(ev3.HorizontalFlip(1.0), (images, y), jax.random.key(0))
    assert bool(jnp.all(x2 == images[:, :, ::-1])) and bool(jnp.all(y2 == y))


def test_gradient_proposer_trains_on_augmented_batches(images):
    y = jnp.arange(len(images)) % 3
    model = eqx.nn.MLP(6 * 5 * 3, 3, 8, 1, key=jax.random.key(0))
    flat = jnp.reshape(images, (len(images), -1))
    params, static = eqx.partition(model, eqx.is_array)

    def proposer(augment):
        return ev3.GradientProposer(
            [ev3.CrossEntropy()], [optax.sgd(0.5)], steps=2, batch_size=8, augment=augment
        )

    aug = ev3.Reshaped(ev3.Compose([ev3.RandomCrop(1), ev3.HorizontalFlip()]), (6, 5, 3))
    with_aug = proposer(aug)
    ps = with_aug.init(params, static, jax.random.key(0))
    run = eqx.filter_jit(lambda p, k: p.propose(params, static, ps, (flat, y), k)[0])
    a, b = run(with_aug, jax.random.key(3)), run(with_aug, jax.random.key(3))
    plain = run(proposer(None), jax.random.key(3))
    leaves = lambda t: jax.tree.leaves(t)  # noqa: E731
    assert all(bool(jnp.all(u == v)) for u, v in zip(leaves(a), leaves(b)))
    assert any(bool(jnp.any(u != v)) for u, v in zip(leaves(a), leaves(plain)))
    # the probability is an array leaf: changing it does not need a new proposer structure
    never = eqx.tree_at(lambda p: p.augment.augment.augments[1].p, with_aug, jnp.float32(0.0))
    assert jax.tree.structure(never) == jax.tree.structure(with_aug)
    with pytest.raises(ConfigurationError, match="AbstractAugment"):
        proposer("crop")
