"""Observability: progress bar, JSON-lines logger, TensorBoard plugin, `ev3 plugins` and tracing.

The `ev3` command runs for real (the installed console script next to this interpreter), and
the TensorBoard plugin is the installed `ev3-tensorboard` distribution found through its entry
point; its event files are read back by decoding the TFRecord framing and the protobufs.
"""

import importlib.metadata
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import ev3core
from ev3core.errors import ConfigurationError, UnknownComponentError

EV3 = str(Path(sys.executable).parent / "ev3")
NAMES = ("accuracy", "neg_cross_entropy")


@pytest.fixture(scope="module")
def setup(tiny_problem):
    """One engine (compiled once for the whole module), its data and an initial state."""
    data, model = tiny_problem
    proposer = ev3core.GradientProposer(
        losses=[ev3core.CrossEntropy()],
        optimizers=[optax.sgd(0.1), optax.sgd(0.01)],
        steps=3,
        batch_size=8,
    )
    engine = ev3core.Pipeline(
        [proposer],
        assessors=list(NAMES),
        assess_size=16,
        decide_size=32,
        plugins=ev3core.load_plugins(autoload=False),
    ).build()
    return engine, data, engine.init(model, jax.random.key(2))


def _run(setup, observers, steps, state=None, chunk=1):
    engine, data, init = setup
    plugins = ev3core.load_plugins(extra=observers, autoload=False)
    return ev3core.run(
        engine, init if state is None else state, data, steps, plugins=plugins, chunk=chunk
    )


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------- progress bar
def test_progress_lines_and_counts_match_the_infos(setup):
    out = io.StringIO()  # not a terminal: plain lines every `every` steps
    bar = ev3core.ProgressBar(every=2, file=out, desc="t")
    _, infos = _run(setup, [bar], 5)
    lines = out.getvalue().splitlines()
    assert [ln.split()[2] for ln in lines] == ["2/5", "4/5", "5/5"]
    assert bar.counts == {
        "accepted": int(np.sum(infos.choice == ev3core.Choice.winner)),
        "kept": int(np.sum(infos.choice == ev3core.Choice.current)),
        "rolled_back": int(np.sum(infos.choice == ev3core.Choice.stable)),
        "significant": int(np.sum(infos.significant)),
        "masked": int(np.sum(infos.num_invalid)),
    }
    c = bar.counts
    assert lines[-1].endswith(
        f"accepted {c['accepted']}  kept {c['kept']}  rolled back "
        f"{c['rolled_back']}  significant {c['significant']}"
    )
    last = float(infos.decide_mean[-1, 0, ev3core.choice_index(infos.choice)[-1]])
    assert f"decide {last:.4f}" in lines[-1]


def test_progress_bar_style_draws_tqdm_and_disable_draws_nothing(setup, monkeypatch):
    out = io.StringIO()
    bar = ev3core.ProgressBar(file=out, style="bar", desc="ev3bar")
    _run(setup, [bar], 3)
    text = out.getvalue()
    assert "ev3bar" in text and "3/3" in text and "accepted" in text and "\r" in text

    monkeypatch.setenv("EV3_NO_PROGRESS", "1")
    quiet_out = io.StringIO()
    quiet = ev3core.ProgressBar(file=quiet_out, style="bar")
    _run(setup, [quiet], 3)
    assert quiet_out.getvalue() == ""
    assert sum(quiet.counts[k] for k in ("accepted", "kept", "rolled_back")) == 3  # still counts
    with pytest.raises(ConfigurationError, match="every"):
        ev3core.ProgressBar(every=0)


# ----------------------------------------------------------------------- JSON lines
def test_jsonl_logger_writes_one_line_per_step(setup, tmp_path):
    engine = setup[0]
    path = tmp_path / "logs" / "steps.jsonl"
    _, infos = _run(setup, [ev3core.JsonlLogger(path, every=3)], 4)
    rows = _read_jsonl(path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    labels = engine.labels()
    for i, r in enumerate(rows):
        assert (
            r["choice"]
            == ["winner", "current", "stable"][int(ev3core.choice_index(infos.choice)[i])]
        )
        assert r["accepted"] == bool(infos.accepted[i])
        assert r["rolled_back"] == bool(infos.rolled_back[i])
        assert r["significant"] == bool(infos.significant[i])
        assert r["num_invalid"] == int(infos.num_invalid[i])
        assert r["winner_label"] == labels[int(infos.winner[i])]
        assert set(r["decide_mean"]) == set(NAMES) == set(r["priorities"])
        for o, name in enumerate(NAMES):
            got = [r["decide_mean"][name][k] for k in ("winner", "current", "stable")]
            np.testing.assert_allclose(got, infos.decide_mean[i, o], rtol=1e-6)
            assert r["priorities"][name] == pytest.approx(float(infos.priorities[i, o]))


def test_jsonl_logger_appends_on_resume_without_duplicate_steps(setup, tmp_path):
    path = tmp_path / "steps.jsonl"
    state2, _ = _run(setup, [ev3core.JsonlLogger(path)], 2)
    _run(setup, [ev3core.JsonlLogger(path)], 2, state=state2)  # a "crash" after step 3 ...
    assert [r["step"] for r in _read_jsonl(path)] == [0, 1, 2, 3]
    with open(path, "a") as f:
        f.write('{"step": 4, "cho')  # ... that tore the last line
    _, infos = _run(setup, [ev3core.JsonlLogger(path)], 3, state=state2)  # resume at step 2
    rows = _read_jsonl(path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["accepted"] for r in rows[2:]] == [bool(a) for a in infos.accepted]


# ----------------------------------------------------------------------- named observers
class _Recorder:
    """An observer that records the lifecycle calls it gets."""

    def __init__(self, tag="rec", calls=None):
        self.tag = tag
        self.calls = [] if calls is None else calls

    def ev3_run_start(self, num_steps):
        self.calls.append((self.tag, "start", num_steps))

    def ev3_after_step(self, step, info):
        self.calls.append((self.tag, "step", step, int(info.step)))

    def ev3_run_end(self, infos):
        self.calls.append((self.tag, "end", len(infos)))


class _ObserverPlugin:
    """A plugin shipping one observer factory, `recorder`, with a keyword option."""

    def __init__(self):
        self.built = []

    @ev3core.hookimpl
    def ev3_register_observers(self):
        def recorder(*, tag="rec"):
            obs = _Recorder(tag)
            self.built.append(obs)
            return obs

        return {"recorder": recorder}


def test_named_observer_is_resolved_through_the_plugins_and_runs_once(setup):
    engine, data, init = setup
    plugin = _ObserverPlugin()
    plugins = ev3core.load_plugins(extra=[plugin], autoload=False)
    assert plugins.components("observer")["recorder"].plugin.endswith("_ObserverPlugin")
    assert {"jsonl", "progress"} <= set(plugins.components("observer"))
    plain = _Recorder("obj", calls=[])
    ev3core.run(engine, init, data, 4, plugins=plugins, observers=["recorder", plain], chunk=2)
    [named] = plugin.built  # built once, for this run only
    assert named.calls == [
        ("rec", "start", 4),
        *[("rec", "step", i, i) for i in range(4)],
        ("rec", "end", 4),
    ]
    assert [c[1:] for c in plain.calls] == [c[1:] for c in named.calls]
    # with options: ev3core's make, or the plugin set's, builds it for `observers=[obj]`
    tagged = plugins.make("observer", "recorder", tag="t")
    assert tagged.tag == "t" and len(plugin.built) == 2
    # the plugin's observer is not a lifecycle hook: a run that does not name it skips it
    ev3core.run(engine, init, data, 1, plugins=plugins)
    assert len(named.calls) == 6 and tagged.calls == []


def test_unknown_observer_name_lists_registered_ones_before_any_step(setup):
    engine, data, init = setup
    plugins = ev3core.load_plugins(extra=[_ObserverPlugin()], autoload=False)
    seen = _Recorder(calls=[])
    # the registry's own lookup and error, as for every other kind of registered name
    with pytest.raises(UnknownComponentError) as err:
        ev3core.run(engine, init, data, 2, plugins=plugins, observers=[seen, "recorderr"])
    msg = str(err.value)
    assert isinstance(err.value, ConfigurationError)
    assert "No observer named 'recorderr'" in msg and "Did you mean 'recorder'?" in msg
    assert "Registered observers: jsonl, progress, recorder." in msg
    assert seen.calls == []  # nothing started
    with pytest.raises(ConfigurationError, match=r"'jsonl' .*cannot be built with no options"):
        ev3core.run(engine, init, data, 2, plugins=plugins, observers=["jsonl"])
    with pytest.raises(ConfigurationError, match="is a string"):
        ev3core.run(engine, init, data, 2, plugins=plugins, observers="progress")


class _ClashingObservers:
    @ev3core.hookimpl
    def ev3_register_observers(self):
        return {"jsonl": _Recorder, "mine": _Recorder}


def test_observer_name_clash_is_reported_like_any_component():
    plugins = ev3core.load_plugins(extra=[_ClashingObservers()], autoload=False)
    comps = plugins.components("observer")
    assert comps["jsonl"].cls is ev3core.JsonlLogger  # the name stays with the first plugin
    assert comps["mine"].cls is _Recorder  # the clashing plugin's other names still load
    [failure] = plugins.failures
    assert failure.stage == "register:observer" and "registered twice" in failure.error


# ----------------------------------------------------------------------- chunked host loop
def _equal_infos(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class _Keep:
    """Keeps every per-step info it is given; raises at step `fail_at`."""

    def __init__(self, fail_at=None):
        self.infos, self.fail_at, self.end = [], fail_at, None

    def ev3_after_step(self, info, step):
        if step == self.fail_at:
            raise RuntimeError("disk full")
        self.infos.append(info)

    def ev3_run_end(self, infos):
        self.end = len(infos)


def test_chunked_run_gives_the_same_infos_with_and_without_per_step_hooks(setup):
    engine, data, init = setup
    plugins = ev3core.load_plugins(autoload=False)  # no plugin takes ev3_after_step
    _, one = ev3core.run(engine, init, data, 5, plugins=plugins)
    _, bare = ev3core.run(engine, init, data, 5, plugins=plugins, chunk=2)  # 2 + 2 + 1 steps
    keep = _Keep()
    _, seen = ev3core.run(engine, init, data, 5, plugins=plugins, chunk=2, observers=[keep])
    assert _equal_infos(one, bare) and _equal_infos(one, seen)
    assert [int(i.step) for i in keep.infos] == [0, 1, 2, 3, 4] and keep.end == 5
    for i, info in enumerate(keep.infos):  # one StepInfo per step, that step's rows
        assert type(info) is ev3core.StepInfo
        assert _equal_infos(info, jax.tree.map(lambda x, i=i: x[i], one))
    chunked = keep.infos[0]  # a chunk's views: NumPy, read-only (they are the run's log)
    assert isinstance(chunked.valid, np.ndarray) and not chunked.valid.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        chunked.assess_mean[0, 0] = 1.0


def test_chunked_run_counts_only_steps_every_hook_saw(setup):
    engine, data, init = setup
    keep = _Keep(fail_at=3)
    with pytest.raises(ev3core.errors.PluginError, match="disk full"):
        ev3core.run(
            engine, init, data, 6, plugins=ev3core.load_plugins(autoload=False), chunk=4,
            observers=[keep],
        )  # fmt: skip
    # steps 0-2 of the first chunk were seen: the run's infos end there (a Checkpointer
    # compares this count with the state's step before saving)
    assert len(keep.infos) == 3 and keep.end == 3


# ----------------------------------------------------------------------- TensorBoard
def _events(logdir):
    """(tag -> {step: value}, session-log steps) from every event file under `logdir`."""
    from tensorboardX.proto import event_pb2

    scalars, sessions = {}, []
    files = sorted(Path(logdir).rglob("events.out.tfevents.*"))
    assert files, f"no event file under {logdir}"
    for f in files:
        raw, i = f.read_bytes(), 0
        while i < len(raw):
            (n,) = struct.unpack("<Q", raw[i : i + 8])
            event = event_pb2.Event.FromString(raw[i + 12 : i + 12 + n])
            i += 12 + n + 4  # length, its CRC, the record, its CRC
            if event.HasField("session_log"):
                sessions.append(event.step)
            for v in event.summary.value:
                scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    return scalars, sessions


def test_tensorboard_plugin_is_installed_and_logs_scalars(setup, tmp_path):
    [ep] = [e for e in importlib.metadata.entry_points(group="ev3") if e.name == "tensorboard"]
    assert ep.dist.name == "ev3-tensorboard"
    from ev3_tensorboard import TensorBoardLogger

    state3, infos = _run(setup, [TensorBoardLogger(tmp_path / "tb")], 3)
    scalars, _ = _events(tmp_path / "tb")
    for o, name in enumerate(NAMES):
        for j, which in enumerate(("winner", "current", "stable")):
            got = scalars[f"decide/{name}/{which}"]
            np.testing.assert_allclose(
                [got[s] for s in range(3)], infos.decide_mean[:, o, j], rtol=1e-6
            )
    assert scalars["decision/accepted"] == {s: float(infos.accepted[s]) for s in range(3)}
    assert scalars["totals/accepted"][2] == float(np.sum(infos.accepted))
    assert scalars["priority/accuracy"][0] == pytest.approx(float(infos.priorities[0, 0]))
    # a resumed run marks the resume point so TensorBoard purges later events of the old run
    _run(setup, [TensorBoardLogger(tmp_path / "tb")], 1, state=state3)
    scalars, sessions = _events(tmp_path / "tb")
    assert 3 in scalars["decision/accepted"] and 3 in sessions


# ----------------------------------------------------------------------- tracing
class _Wrapper:
    @ev3core.hookimpl(wrapper=True)
    def ev3_assess(self, assessors):
        return (yield)


def test_trace_shows_registrations_and_hook_calls_in_order(setup):
    lines = []
    p = ev3core.load_plugins(autoload=False)
    stop = p.trace(lines.append)
    assert p.tracing
    p.register(_Wrapper(), name="wrapper")
    ev3core.Pipeline([setup[0].proposers[0]], ["accuracy"], plugins=p).build()
    text = "".join(lines)
    assert "register plugin wrapper: ev3_assess" in text
    assert "ev3_register_assessors() [ev3core.builtins] -> ['accuracy'," in text
    assert "ev3_explore(proposers=(GradientProposer,), assessors=(Accuracy,))" in text
    assert "ev3_assess(assessors=(Accuracy,)) -> calls wrapper, ev3core.builtins" in text
    assert text.index("ev3_explore(") < text.index("ev3_assess(") < text.index("ev3_adapt(")
    stop()
    n = len(lines)
    ev3core.Pipeline([setup[0].proposers[0]], ["accuracy"], plugins=p).build()
    assert len(lines) == n and not p.tracing


# ----------------------------------------------------------------------- the command
def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EV3_")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory):
    """A site directory with an installed (dist-info) plugin whose import fails."""
    site = tmp_path_factory.mktemp("site")
    dist = site / "ev3_halfbaked-0.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ev3-halfbaked\nVersion: 0.2\n")
    (dist / "entry_points.txt").write_text("[ev3]\nhalfbaked = ev3_halfbaked_mod\n")
    (site / "ev3_halfbaked_mod.py").write_text("raise ImportError('needs a missing library')\n")
    return site


def test_ev3_plugins_json_lists_plugins_hooks_components_and_failures(broken_site):
    res = subprocess.run(
        [EV3, "plugins", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(PYTHONPATH=str(broken_site), EV3_TRACE_PLUGINS="1"),
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)  # the trace goes to stderr, stdout stays JSON
    by_name = {p["name"]: p for p in report["plugins"]}
    builtins = by_name["ev3core.builtins"]
    assert builtins["distribution"] == "ev3core" and builtins["version"] == ev3core.__version__
    assert {"kind": "proposer", "name": "gradient"} in builtins["components"]
    assert {"kind": "bound", "name": "paired"} in builtins["components"]
    tb = by_name["tensorboard"]
    assert (tb["distribution"], tb["version"]) == ("ev3-tensorboard", "0.1.0")
    assert tb["hooks"] == [
        "ev3_after_step",
        "ev3_register_observers",
        "ev3_run_end",
        "ev3_run_start",
    ]
    assert tb["components"] == [{"kind": "observer", "name": "tensorboard"}]
    observe = by_name["ev3core.observe"]  # the built-in observers, listed like components
    assert observe["components"] == [
        {"kind": "observer", "name": "progress"},
        {"kind": "observer", "name": "jsonl"},
    ]
    [failure] = report["failures"]
    assert (failure["name"], failure["distribution"], failure["stage"]) == (
        "halfbaked",
        "ev3-halfbaked",
        "import",
    )
    assert "needs a missing library" in failure["error"]
    assert "ev3 trace: register plugin ev3core.builtins (ev3core" in res.stderr
    assert "ev3_register_proposers() [ev3core.builtins] -> ['gradient', 'pbt']" in res.stderr


def test_ev3_plugins_trace_shows_a_pipeline_being_built(broken_site):
    res = subprocess.run(
        [EV3, "plugins", "--trace"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(PYTHONPATH=str(broken_site)),
    )
    assert res.returncode == 0, res.stderr
    err = res.stderr
    # stage hooks see resolved components, never the pipeline
    assert "ev3 trace: ev3_explore(proposers=(GradientProposer,), assessors=(" in err
    assert "ev3 trace: ev3_assess(assessors=(Accuracy, NegCrossEntropy))" in err
    assert "ev3 trace: ev3_adapt(scheduler=EV3Scheduler, assessors=(" in err
    assert "pipeline=" not in err
    assert "ev3_adapt returned EV3Scheduler" in err
    assert "ev3core.builtins  [ev3core " in res.stdout
    assert "  proposer: gradient" in res.stdout
    assert "  observer: progress, jsonl" in res.stdout
    assert "  observer: tensorboard" in res.stdout
    assert "FAILED halfbaked (from ev3-halfbaked) during import: ImportError" in res.stdout


def test_ev3_run_no_progress_jsonl_and_tensorboard_env(tmp_path):
    log = tmp_path / "steps.jsonl"
    res = subprocess.run(
        [
            EV3,
            "run",
            "--smoke",
            "--steps",
            "3",
            "--examples",
            "2048",
            "--no-progress",
            "--log-jsonl",
            str(log),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(EV3_TENSORBOARD_LOGDIR=str(tmp_path / "tb")),
    )
    assert res.returncode == 0, res.stderr
    assert "ev3 smoke step" not in res.stderr + res.stdout  # no progress shown
    summary = json.loads(res.stdout)  # stdout holds only the summary
    rows = _read_jsonl(log)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert sum(r["accepted"] for r in rows) == summary["accepted"]
    assert sum(r["choice"] == "current" for r in rows) == summary["kept"]
    scalars, _ = _events(tmp_path / "tb")  # the installed plugin, switched on by the env var
    assert sorted(scalars["decision/accepted"]) == [0, 1, 2]
    assert [scalars["decision/accepted"][s] for s in range(3)] == [
        float(r["accepted"]) for r in rows
    ]


def test_ev3_run_observer_flag_enables_registered_observers(tmp_path):
    log, tb = tmp_path / "named.jsonl", tmp_path / "tb"
    res = subprocess.run(
        [
            *(EV3, "run", "--smoke", "--steps", "3", "--examples", "2048", "--no-progress"),
            *("--observer", f"jsonl:path={log},every=2"),  # built-in, with options
            *("--observer", f"tensorboard:logdir={tb}"),  # the installed plugin's
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),  # no EV3_TENSORBOARD_LOGDIR: the plugin logs only because it was named
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    rows = _read_jsonl(log)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert sum(r["accepted"] for r in rows) == summary["accepted"]
    scalars, _ = _events(tb)
    assert [scalars["decision/accepted"][s] for s in range(3)] == [
        float(r["accepted"]) for r in rows
    ]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("progres", "No observer named 'progres'. Did you mean 'progress'? Registered "
         "observers: jsonl, progress, tensorboard."),
        ("jsonl", "cannot be built with no options"),
        ("jsonl:path", "'path' is not KEY=VALUE"),
    ],
)  # fmt: skip
def test_ev3_run_bad_observer_fails_before_the_run(spec, expected, tmp_path):
    res = subprocess.run(
        [EV3, "run", "--smoke", "--out", str(tmp_path / "out"), "--observer", spec],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("ev3: error: ") and expected in res.stderr
    assert not (tmp_path / "out" / "ev3-run.json").exists()  # nothing recorded or run
