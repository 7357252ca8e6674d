"""Candidate sharding with `jax.sharding`: a mesh axis named `"candidate"`, and optionally a
second one named `"data"` that splits each candidate's examples.

The engine never moves parameters between devices by hand. It states *where* arrays live
(`NamedSharding` / `with_sharding_constraint`) and lets XLA's SPMD partitioner do the rest;
assessment and the winner's extraction are written with `jax.shard_map`, so they provably run
where the candidates are and only scores (and then the winner's parameters) cross devices.

Layout rule (also used for multi-host runs, where the mesh spans every process's devices):

* the candidates, padded to a multiple of the number of candidate shards, are split on their
  leading axis;
* a leaf of a proposer state is split on its leading axis when that axis is a positive
  multiple of the number of shards (per-candidate optimizer states, for instance); any other
  leaf is replicated;
* everything else (current and stable parameters, scheduler state, history, key, data) is
  replicated.

With a `"data"` axis, every array above is also replicated over it; what is split over it
is examples: a proposer's minibatches (`split_examples`, a sharding constraint that XLA's
partitioner turns into data parallelism, gradients reduced over `"data"`) and the assess and
decide examples (the engine's scoring `shard_map`s).

The layout only decides where work happens: a jitted program computes the same values
whatever the shardings of its inputs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, PyTree

from .errors import ConfigurationError

#: The name of the mesh axis over which candidates are split.
CANDIDATE_AXIS = "candidate"
#: The name of the optional mesh axis over which each candidate's examples are split.
DATA_AXIS = "data"


def candidate_mesh(
    devices: Sequence[Any] | None = None, *, candidates: int | None = None, data: int = 1
) -> Mesh:
    """The mesh an `Engine(mesh=...)` splits its work over, on `devices` (default: every
    device of every process, `jax.devices()`).

    With `data=1` (default), one axis named `"candidate"` over all the devices: the
    candidates are split over them. With `data > 1`, a `(candidates, data)` mesh with axes
    `("candidate", "data")`: the candidates are split over the first axis and each
    candidate's examples (its trajectory minibatches, the assess and decide examples) over
    the second, so a candidate whose batch does not fit one device runs data-parallel over
    `data` devices. Consecutive devices form a data group (the axis with the most traffic:
    gradients are reduced over it at every trajectory step).

    **Arguments:**

    - `devices`: the devices, in order; default `jax.devices()`.
    - `candidates`: the size of the `"candidate"` axis; default `len(devices) // data`.
    - `data`: the size of the `"data"` axis (1: no data axis).

    `candidates * data` must equal the number of devices.

    ```python
    import ev3core
    mesh = ev3core.candidate_mesh()  # all devices, candidates only
    mesh = ev3core.candidate_mesh(candidates=2, data=4)  # 8 devices: 2 x 4
    ```
    """
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ConfigurationError("candidate_mesh: got an empty list of devices.")
    n = len(devs)
    if isinstance(data, bool) or not isinstance(data, int | np.integer) or data < 1:
        raise ConfigurationError(
            f"candidate_mesh: data={data!r} must be a positive integer (1: no data axis)."
        )
    if candidates is None:
        if n % data:
            raise ConfigurationError(
                f"candidate_mesh: {n} devices do not split into data={data} shards. Use a "
                f"data size that divides {n}, or pass devices=jax.devices()[:{n // data * data}]."
            )
        candidates = n // data
    if (
        isinstance(candidates, bool)
        or not isinstance(candidates, int | np.integer)
        or (candidates < 1)
    ):
        raise ConfigurationError(
            f"candidate_mesh: candidates={candidates!r} must be a positive integer."
        )
    candidates, data = int(candidates), int(data)
    if candidates * data != n:
        raise ConfigurationError(
            f"candidate_mesh: candidates={candidates} x data={data} = {candidates * data} "
            f"devices, but {n} were given. Make candidates * data equal the number of devices "
            f"(e.g. candidates={max(1, n // data)}, data={data}), or pass "
            f"devices=jax.devices()[:{candidates * data}]."
        )
    grid = np.asarray(devs, dtype=object)
    if data == 1:
        return Mesh(grid, (CANDIDATE_AXIS,))
    return Mesh(grid.reshape(candidates, data), (CANDIDATE_AXIS, DATA_AXIS))


def check_mesh(mesh: Any) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise ConfigurationError(
            f"mesh={mesh!r} is not a jax.sharding.Mesh. Build one with "
            "ev3core.candidate_mesh() or jax.sharding.Mesh(devices, ('candidate',)) "
            "(or ('candidate', 'data'))."
        )
    if CANDIDATE_AXIS not in mesh.axis_names:
        raise ConfigurationError(
            f"The mesh has axes {tuple(mesh.axis_names)} but no {CANDIDATE_AXIS!r} axis, over "
            "which the engine splits its candidates. Name one mesh axis 'candidate', e.g. "
            "ev3core.candidate_mesh(devices), or ev3core.candidate_mesh(devices, data=n) for "
            "a ('candidate', 'data') mesh."
        )
    return mesh


def num_shards(mesh: Mesh) -> int:
    """Number of candidate shards (size of the mesh's `"candidate"` axis)."""
    return int(mesh.shape[CANDIDATE_AXIS])


def data_shards(mesh: Mesh) -> int:
    """Number of example shards (size of the mesh's `"data"` axis; 1 without one)."""
    return int(dict(mesh.shape).get(DATA_AXIS, 1))


_EXAMPLE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "ev3core_example_mesh", default=None
)


@contextlib.contextmanager
def splitting_examples(mesh: Mesh | None) -> Iterator[None]:
    """While tracing a proposer: `split_examples` splits over `mesh`'s `"data"` axis."""
    token = _EXAMPLE_MESH.set(mesh)
    try:
        yield
    finally:
        _EXAMPLE_MESH.reset(token)


def split_examples(batch: PyTree[Array], axis: int = 0) -> PyTree[Array]:
    """Split a batch's example axis over the `"data"` axis of the engine's mesh.

    Call it in a proposer's traced code on each minibatch it computes a loss on. When the
    engine runs on a mesh with a `"data"` axis (`ev3core.candidate_mesh(data=n)`), it is a
    sharding constraint on the example axis (`axis`) of every array leaf, which XLA's
    partitioner turns into data parallelism: each device of a candidate's data group holds
    `1/n` of the examples and their activations, and a loss's reduction over examples (so
    its gradient) becomes a sum across the group. The values computed are those of the
    unsplit batch, up to float reduction order: batch statistics and batch-level losses stay
    global. Anywhere else (one device, a mesh without `"data"`, outside an engine's step) it
    returns `batch` unchanged. Inside `jax.vmap` (over candidates), the mapped axis is left to
    the partitioner.

    ```python
    batch = ev3core.split_examples(jax.tree.map(lambda a: a[idx], data))
    ```
    """
    mesh = _EXAMPLE_MESH.get()
    if mesh is None or data_shards(mesh) == 1:
        return batch

    def one(x: Any) -> Any:
        if not eqx.is_array(x) or jnp.ndim(x) <= axis:
            return x
        spec: list[Any] = [P.UNCONSTRAINED] * jnp.ndim(x)
        spec[axis] = DATA_AXIS
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))

    return jax.tree.map(one, batch)


def padded_size(k: int, shards: int) -> int:
    """`k` rounded up to a multiple of `shards` (the candidates are padded to this size)."""
    return -(-k // shards) * shards


def _leading_spec(x: Any, shards: int) -> P:
    shape = jnp.shape(x)
    if len(shape) >= 1 and shape[0] > 0 and shape[0] % shards == 0:
        return P(CANDIDATE_AXIS)
    return P()


def state_specs(state: Any, mesh: Mesh) -> Any:
    """The `PartitionSpec` of every array leaf of an engine `State` (see the module rule)."""
    shards = num_shards(mesh)
    specs = jax.tree.map(lambda _: P(), state)
    per_candidate = jax.tree.map(lambda x: _leading_spec(x, shards), state.proposer_states)
    return _replace_proposer_states(specs, per_candidate)


def _replace_proposer_states(state: Any, proposer_states: Any) -> Any:
    return eqx.tree_at(
        lambda s: s.proposer_states, state, proposer_states, is_leaf=lambda x: x is None
    )


def constrain(tree: PyTree[Any], mesh: Mesh, specs: PyTree[Any]) -> PyTree[Any]:
    """`with_sharding_constraint` leaf-wise (inside a jitted function)."""
    return jax.tree.map(
        lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s)), tree, specs
    )


def _put(x: Any, sharding: NamedSharding) -> Array:
    """A global array with `sharding` from an array every process holds in full."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.dtypes.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=impl)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_state(state: Any, mesh: Mesh) -> Any:
    """Place an engine `State` on `mesh` by the layout rule (per-candidate proposer states
    split over the `"candidate"` axis, the rest replicated).

    Works in multi-process runs too: every process passes the same (full) state, for instance
    from `engine.init` with the same key, or from `load_checkpoint`.
    """
    mesh = check_mesh(mesh)
    specs = state_specs(state, mesh)
    return jax.tree.map(lambda x, s: _put(x, NamedSharding(mesh, s)), state, specs)


def replicate(tree: PyTree[Any], mesh: Mesh) -> PyTree[Any]:
    """Copy every array leaf of `tree` (e.g. an `ev3core.Data`) to every device of `mesh`.

    In a multi-process run every process passes the same arrays (for instance generated from
    the same key); the result is one global array per leaf.
    """
    mesh = check_mesh(mesh)
    everywhere = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: _put(x, everywhere) if eqx.is_array(x) else x, tree)


def to_host(tree: PyTree[Any]) -> PyTree[Any]:
    """`jax.device_get(tree)` that also works in a multi-process run.

    A leaf this process holds entirely is copied as by `jax.device_get` (one batched
    transfer). A leaf that spans other processes' devices is read from this process's own
    copy when it is replicated, and gathered from every process
    (`multihost_utils.process_allgather`) when it is sharded, such as the per-candidate
    `StepInfo.valid`. The gather is a collective: every process must call `to_host` on the
    same arrays in the same order, as the host run loop does.
    """
    leaves, treedef = jax.tree.flatten(tree)
    remote = [isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves]
    local = jax.device_get([x for x, r in zip(leaves, remote, strict=True) if not r])
    it = iter(local)
    out = []
    for x, r in zip(leaves, remote, strict=True):
        if not r:
            out.append(next(it))
        elif x.is_fully_replicated:
            out.append(np.asarray(x.addressable_data(0)))
        else:
            from jax.experimental import multihost_utils

            out.append(np.asarray(multihost_utils.process_allgather(x, tiled=True)))
    return jax.tree.unflatten(treedef, out)
