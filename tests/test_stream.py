"""Streamed data: `ev3core.run` on a grain dataset through `DataStream`, with the iterator
position in the checkpoint, so a run interrupted with Ctrl-C resumes exactly; the background
reader's order, position, errors and shutdown."""

import gc
import os
import signal
import subprocess
import sys
import threading

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


# The background reader. These tests wait for the reader with events and conditions (the
# timeouts only keep a broken reader from hanging the run), never with sleeps.
WAIT = 60


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _reference(n):
    """The grain iterator's first `n` positions and elements, read directly."""
    it = iter(_grain_dataset().repeat())
    positions, elements = [], []
    for _ in range(n):
        positions.append(it.get_state())
        elements.append(next(it))
    return positions, elements


class _Watched:
    """A grain iterator (with its position) that fails at element `at` in the way `fail`
    names, or (without `fail`) reads element `at`, sets `reached` and waits for `go` (when
    `gated`) before it returns it: the read is then in flight, the position half moved."""

    def __init__(self, dataset, at=None, *, fail=None, gated=False):
        self.it, self.at, self.fail, self.i = iter(dataset), at, fail, 0
        self.reached, self.go = threading.Event(), threading.Event()
        if not gated:
            self.go.set()

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == self.at and self.fail is not None:
            self.reached.set()
            if self.fail == "raises":
                raise ValueError("element 3 is broken")
            if self.fail == "not Data":
                return 3
            if self.fail == "ran out":
                raise StopIteration
            d = next(self.it)
            short = tuple(a[:-1] for a in d.decide)  # a short batch
            return ev3.Data(propose=d.propose, assess=d.assess, decide=short)
        item = next(self.it)
        if self.i == self.at:
            self.reached.set()
            assert self.go.wait(WAIT)
        self.i += 1
        return item

    def get_state(self):
        return {"inner": self.it.get_state(), "i": self.i}

    def set_state(self, state):
        self.it.set_state(state["inner"])
        self.i = state["i"]


def _read_ahead(stream, n):
    """Waits until the background reader has queued `n` elements (or errors)."""
    reader = stream._reader
    with reader.cond:
        assert reader.cond.wait_for(lambda: len(reader.ahead) >= n, WAIT)


@pytest.mark.parametrize("background", [True, False])
def test_stream_keeps_the_iterators_order_and_positions(background):
    positions, elements = _reference(25)
    stream = ev3.DataStream(_grain_dataset().repeat(), prefetch=3, background=background)
    for k in range(25):
        assert stream.position() == positions[k]
        if k % 4 == 0:
            assert _same(stream.peek(), elements[k])
        assert _same(next(stream), elements[k])
    assert stream.taken == 25
    stream.close()


def test_position_and_restore_are_exact_with_reads_in_flight():
    positions, elements = _reference(9)
    src = _Watched(_grain_dataset().repeat(), at=4, gated=True)
    stream = ev3.DataStream(src, prefetch=2)
    for k in range(4):
        assert _same(next(stream), elements[k])
    assert src.reached.wait(WAIT)  # element 4 is being read, nothing is queued
    assert stream.position() == {"inner": positions[4], "i": 4}
    saved = stream.position()
    src.go.set()
    for k in range(4, 7):
        assert _same(next(stream), elements[k])
    _read_ahead(stream, 2)  # elements 7 and 8 read ahead
    assert stream.position() == {"inner": positions[7], "i": 7}

    # back to element 4, the read-ahead dropped; then while element 6 is being read again
    stream.restore(saved)
    src.at, src.reached, src.go = 6, threading.Event(), threading.Event()
    for k in range(4, 6):
        assert _same(next(stream), elements[k])
    assert src.reached.wait(WAIT)
    src.go.set()  # the read of element 6 finishes before or during the restore: either way
    stream.restore(saved)
    for k in range(4, 9):
        assert _same(next(stream), elements[k])

    # a fresh stream restored from the position gives the same elements
    fresh = ev3.DataStream(_Watched(_grain_dataset().repeat()), prefetch=2)
    fresh.restore(saved)
    assert _same(next(fresh), elements[4])
    stream.close()
    fresh.close()


ERRORS = {
    "raises": (ValueError, "element 3 is broken"),
    "not Data": (ConfigurationError, "yielded a int, not an ev3core.Data"),
    "shape": (ConfigurationError, "element 3 has shapes"),
    "ran out": (ConfigurationError, r"ran out after 3 element\(s\)"),
}


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("fail", list(ERRORS))
def test_read_errors_are_raised_where_their_element_is_taken(fail, background):
    _, elements = _reference(3)
    src = _Watched(_grain_dataset().repeat(), at=3, fail=fail)
    stream = ev3.DataStream(src, prefetch=5, background=background)
    assert _same(stream.peek(), elements[0])
    if background:
        _read_ahead(stream, 4)  # elements 0-2 and the error are queued
    else:
        assert _same(next(stream), elements[0])  # reads up to and including the error
    assert src.reached.is_set()
    for k in range(0 if background else 1, 3):
        assert _same(next(stream), elements[k])
    kind, message = ERRORS[fail]
    with pytest.raises(kind, match=message):
        next(stream)
    assert stream.taken == 3
    stream.close()


def test_close_stops_the_reader_and_keeps_the_position():
    positions, elements = _reference(4)
    stream = ev3.DataStream(_grain_dataset().repeat(), prefetch=2)
    assert _same(next(stream), elements[0])
    _read_ahead(stream, 2)  # the reader now waits for room in the queue
    thread = stream._reader.thread
    assert thread.is_alive()
    stream.close()
    assert not thread.is_alive()
    stream.close()  # idempotent
    assert stream.position() == positions[1]
    assert _same(next(stream), elements[1])  # reads again
    stream.close()
    stream.close()
    assert not stream._reader.thread.is_alive()

    with ev3.DataStream(_grain_dataset().repeat()) as managed:
        assert _same(managed.peek(), elements[0])
        thread = managed._reader.thread
        assert thread.is_alive()
    assert not thread.is_alive()

    # a stream dropped without close() stops its reader
    dropped = ev3.DataStream(_grain_dataset().repeat())
    dropped.peek()
    thread = dropped._reader.thread
    del dropped
    gc.collect()
    thread.join(WAIT)
    assert not thread.is_alive()


def test_background_false_reads_on_the_calling_thread():
    stream = ev3.DataStream(_grain_dataset().repeat(), background=False)
    next(stream)
    assert stream._reader.thread is None
    stream.close()


# Run in a fresh interpreter: a handler registered before ev3core is imported runs after
# ev3core's own exit handlers (atexit is last in, first out), so it sees whether they stopped
# the reader before Python finalizes, when a daemon thread still in native code aborts the
# process.
_EXIT_SCRIPT = """
import atexit, threading
def check():
    alive = [t.name for t in threading.enumerate() if t.name == "ev3core-DataStream"]
    print("readers alive at exit:", alive, flush=True)
atexit.register(check)

import grain, numpy as np
import ev3core as ev3

x = np.arange(4096, dtype=np.float32).reshape(-1, 2)
y = np.zeros(len(x), np.int32)
def to_data(idx):
    return ev3.Data(propose=(x[idx], y[idx]), assess=(x[idx], y[idx]), decide=(x[idx], y[idx]))
data = grain.MapDataset.source(np.arange(len(x))).batch(64, drop_remainder=True).map(to_data)
stream = ev3.DataStream(data.repeat(), prefetch=4)
next(stream)  # the reader keeps reading ahead; the script ends without close()
"""


def test_a_running_reader_is_stopped_before_the_interpreter_exits(tmp_path):
    script = tmp_path / "exit_with_reader.py"
    script.write_text(_EXIT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "EV3_DISABLE_PLUGIN_AUTOLOAD"}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "readers alive at exit: []" in proc.stdout, (proc.stdout, proc.stderr[-3000:])
    assert "FATAL" not in proc.stderr
