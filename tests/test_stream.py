"""Streamed data: `ev3core.run` on a grain dataset through `DataStream`, with the iterator
position in the checkpoint, so a run interrupted with Ctrl-C resumes exactly."""

import os
import signal

import equinox as eqx
import grain
import jax
import numpy as np
import optax
import pytest

import ev3core as ev3
from ev3core._host.ckpt_format import state_digest
from ev3core.errors import CheckpointError, ConfigurationError, RunInterrupted

# `make test` runs `pytest -n 2 --dist loadgroup`: this module's tests run
# in one worker, which compiles the engine and runs `uninterrupted` once for all of them.
pytestmark = pytest.mark.xdist_group("stream")


N, B = 2048, 64
STEPS = 6


def _arrays():
    rng = np.random.default_rng(0)  # host-side data generation, outside the numeric path
    x = rng.normal(size=(N, 2)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    return x, y


def _grain_dataset():
    """Every element is one step's Data: a fresh shuffled propose / assess / decide batch."""
    x, y = _arrays()

    def to_data(idx):
        p, a, d = idx[:B], idx[B : 2 * B], idx[2 * B :]
        return ev3.Data(propose=(x[p], y[p]), assess=(x[a], y[a]), decide=(x[d], y[d]))

    return (
        grain.MapDataset.source(np.arange(N))
        .shuffle(seed=7)
        .batch(3 * B, drop_remainder=True)
        .map(to_data)
    )


def _ragged():
    """Full batches, then the short remainder batch of an epoch (no drop_remainder)."""
    x, y = _arrays()
    for idx in (np.arange(3 * B), np.arange(3 * B, 3 * B + 2 * B)):
        p, a, d = idx[:B], idx[B : 2 * B], idx[2 * B :]
        yield ev3.Data(propose=(x[p], y[p]), assess=(x[a], y[a]), decide=(x[d], y[d]))


@pytest.fixture(scope="module")
def problem():
    proposer = ev3.GradientProposer(
        [ev3.CrossEntropy(1.0), ev3.CrossEntropy(0.5)], [optax.sgd(0.1)], steps=2, batch_size=16
    )
    engine = ev3.Engine([proposer], [ev3.Accuracy()], ev3.EV3Scheduler(), 32, 64)
    init = engine.init(_model(), jax.random.key(0))
    return engine, init


def _model():
    return eqx.nn.MLP(2, 2, 8, 1, key=jax.random.key(1))


def _plugins(*extra):
    return ev3.load_plugins(extra=list(extra), autoload=False)


class _InterruptAt:
    """Sends this process SIGINT (as Ctrl-C would) after the given run step."""

    def __init__(self, step):
        self.step = step

    @ev3.hookimpl
    def ev3_after_step(self, step):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def uninterrupted(problem):
    engine, init = problem
    stream = ev3.DataStream(_grain_dataset().repeat())
    state, infos = ev3.run(engine, init, stream, STEPS, plugins=_plugins())
    assert stream.taken == STEPS and infos.step.shape == (STEPS,)
    return state


def test_stream_gives_each_step_fresh_data(problem, uninterrupted):
    engine, init = problem
    # the same elements by hand, step by step, give the same state as the streamed run
    it = iter(_grain_dataset().repeat())
    state = init
    for _ in range(STEPS):
        state, _ = engine.step(state, jax.device_put(next(it)))
    assert state_digest(state) == state_digest(uninterrupted)
    # and the data really changes from step to step
    two = iter(_grain_dataset())
    a, b = next(two), next(two)
    assert not np.array_equal(a.propose[0], b.propose[0])


def test_interrupted_stream_resumes_to_the_same_state(problem, uninterrupted, tmp_path):
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("another SIGINT handler is installed; run would leave it alone")
    engine, init = problem
    stream = ev3.DataStream(_grain_dataset().repeat(), prefetch=3)
    ck = ev3.Checkpointer(tmp_path, every=100, stream=stream)
    with pytest.raises(RunInterrupted) as err:
        ev3.run(engine, init, stream, STEPS, plugins=_plugins(_InterruptAt(2), ck))
    done = err.value.steps_done
    assert done == 3 and stream.taken == 3  # prefetched elements were read but not taken

    # a fresh process would do this: a new stream, the checkpoint, its data position
    loaded, manifest = ev3.load_checkpoint(tmp_path, like=init)
    assert manifest["metadata"]["data_position"] is not None
    resumed = ev3.DataStream(_grain_dataset().repeat(), prefetch=3)
    resumed.restore(manifest)
    final, _ = ev3.run(engine, loaded, resumed, STEPS - done, plugins=_plugins())
    assert state_digest(final) == state_digest(uninterrupted)


def test_stream_errors_are_explained(problem):
    engine, init = problem
    with pytest.raises(ConfigurationError, match="ran out"):
        ev3.run(engine, init, ev3.DataStream(_grain_dataset()[:2]), 5, plugins=_plugins())
    ragged = ev3.DataStream(_ragged())
    with pytest.raises(ConfigurationError, match="element 1 has shapes"):
        ev3.run(engine, init, ragged, 3, plugins=_plugins())
    with pytest.raises(ConfigurationError, match="not an ev3core.Data"):
        ev3.run(engine, init, ev3.DataStream(iter([1, 2])), 1, plugins=_plugins())
    with pytest.raises(ConfigurationError, match="chunk=1"):
        ev3.run(engine, init, ev3.DataStream(_grain_dataset()), 2, chunk=2, plugins=_plugins())
    with pytest.raises(CheckpointError, match="get_state"):
        ev3.Checkpointer("unused", stream=ev3.DataStream(iter([])))
