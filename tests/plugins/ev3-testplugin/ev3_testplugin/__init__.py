"""A gradient-free proposer: Gaussian perturbations of the current parameters."""

import equinox as eqx
import jax
import jax.numpy as jnp

import ev3core


class GaussianNoise(ev3core.AbstractProposer):
    scale: jax.Array = eqx.field(converter=jnp.asarray, default=0.01)
    population: int = eqx.field(static=True, default=4)

    @property
    def num_candidates(self) -> int:
        return self.population

    def labels(self):
        return tuple(f"noise#{i}" for i in range(self.population))

    def init(self, params, static, key):
        return None

    def propose(self, params, static, state, data, key):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        scale = self.scale
        noisy = [
            x + scale.astype(x.dtype) * jax.random.normal(k, (self.population, *x.shape), x.dtype)
            for x, k in zip(leaves, keys)
        ]
        return jax.tree.unflatten(treedef, noisy), state

    def adapt(self, state, outcome):
        return state


@ev3core.hookimpl
def ev3_register_proposers():
    return {"gaussian_noise": GaussianNoise}
