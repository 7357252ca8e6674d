"""Plugin manager: entry-point discovery through real installs, failures, names, hooks."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import optax
import pytest

import ev3core
from ev3core.errors import (
    DuplicateComponentError,
    PluginError,
    UnknownComponentError,
)

# `make test` runs `pytest -n 2 --dist loadgroup`: this module's tests run
# in one worker, which pip-installs the test plugins (`installed`) once for all of them.
pytestmark = pytest.mark.xdist_group("plugins")

HERE = Path(__file__).parent
PLUGIN_DIRS = [HERE / "plugins" / "ev3-testplugin", HERE / "plugins" / "ev3-brokenplugin"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory, pip_install_target) -> Path:
    """`pip install` the two test plugin distributions into a fresh target directory."""
    target = pip_install_target(tmp_path_factory.mktemp("site"), *PLUGIN_DIRS)
    assert (target / "ev3_testplugin").is_dir()
    return target


def _run_with(site: Path, code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EV3_")}
    full_env["PYTHONPATH"] = str(site)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


DISCOVER = """
import json, ev3core
p = ev3core.load_plugins()
comps = p.components("proposer")
out = {
    "proposers": {k: [v.plugin, v.cls.__module__] for k, v in comps.items()},
    "failures": [[f.name, f.distribution, f.stage, f.error] for f in p.failures],
    "plugins": {i.name: [i.distribution, i.version] for i in p.plugin_infos()},
}
print(json.dumps(out))
"""


def test_installed_plugin_is_found_through_its_entry_point(installed):
    res = _run_with(installed, DISCOVER)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["proposers"]["gaussian_noise"] == ["testplugin", "ev3_testplugin"]
    assert out["plugins"]["testplugin"] == ["ev3-testplugin", "0.0.1"]
    # the broken plugin is reported with its name, distribution and error, and skipped
    [failure] = out["failures"]
    assert failure[:3] == ["brokenplugin", "ev3-brokenplugin", "import"]
    assert "broken on purpose" in failure[3]
    assert "brokenplugin" in res.stderr  # the user is told


def test_found_proposer_runs_in_a_pipeline(installed):
    code = """
    import equinox as eqx, jax, jax.numpy as jnp, ev3core
    p = ev3core.load_plugins()
    engine = ev3core.Pipeline(
        proposers=[p.make("proposer", "gaussian_noise", scale=0.1, population=3)],
        assessors=["neg_cross_entropy"], assess_size=16, decide_size=32, plugins=p,
    ).build()
    x = jax.random.normal(jax.random.key(0), (64, 2)); y = (x[:, 0] > 0).astype(jnp.int32)
    data = ev3core.Data(propose=(x, y), assess=(x, y), decide=(x, y))
    state = engine.init(eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(1)), jax.random.key(2))
    state, info = engine.step(state, data)
    print(engine.labels(), int(info.winner))
    """
    res = _run_with(installed, code)
    assert res.returncode == 0, res.stderr
    assert "p0:noise#0" in res.stdout


def test_raise_plugin_errors_makes_a_broken_plugin_fatal(installed):
    res = _run_with(installed, DISCOVER, EV3_RAISE_PLUGIN_ERRORS="1")
    assert res.returncode != 0
    assert "PluginError" in res.stderr and "brokenplugin" in res.stderr


def test_disable_autoload_and_allowlist(installed):
    off = _run_with(installed, DISCOVER, EV3_DISABLE_PLUGIN_AUTOLOAD="1")
    assert off.returncode == 0, off.stderr
    out = json.loads(off.stdout)
    assert "gaussian_noise" not in out["proposers"] and out["failures"] == []
    assert "gradient" in out["proposers"]  # built-ins always load

    only = _run_with(installed, DISCOVER, EV3_LOAD_PLUGINS="testplugin")
    assert only.returncode == 0, only.stderr
    out = json.loads(only.stdout)
    assert "gaussian_noise" in out["proposers"] and out["failures"] == []


def test_ev3_plugins_command_lists_plugins_and_failures(installed):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EV3_")}
    env["PYTHONPATH"] = str(installed)
    res = subprocess.run(
        [sys.executable, "-m", "ev3core._host.cli", "plugins", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    names = {p["name"]: p for p in out["plugins"]}
    assert {"kind": "proposer", "name": "gaussian_noise"} in names["testplugin"]["components"]
    assert "ev3_register_proposers" in names["ev3core.builtins"]["hooks"]
    assert out["failures"][0]["name"] == "brokenplugin"


# ---------------------------------------------------------------- in-process behaviour
class _DupePlugin:
    @ev3core.hookimpl
    def ev3_register_assessors(self):
        return {"accuracy": ev3core.Accuracy}


def test_duplicate_names_name_both_plugins():
    # Reported as the later plugin's failure (see test_hostile.py); fatal when asked to be.
    p = ev3core.load_plugins(extra=[_DupePlugin()], autoload=False, raise_errors=True)
    with pytest.raises(DuplicateComponentError) as err:
        p.components("assessor")
    msg = str(err.value)
    assert "'accuracy'" in msg and "ev3core.builtins" in msg and "_DupePlugin" in msg


def test_unknown_name_lists_close_matches(builtin_plugins):
    p = builtin_plugins
    with pytest.raises(UnknownComponentError) as err:
        p.get("assessor", "acuracy")
    assert "'accuracy'" in str(err.value) and "Did you mean" in str(err.value)
    with pytest.raises(UnknownComponentError):
        ev3core.Pipeline(proposers=["gradiant"], plugins=p).build()


class _BadRegistration:
    @ev3core.hookimpl
    def ev3_register_proposers(self):
        return {"not_a_proposer": int}


def test_bad_registration_is_reported_and_skipped():
    p = ev3core.load_plugins(extra=[_BadRegistration()], autoload=False)
    comps = p.components("proposer")
    assert "not_a_proposer" not in comps and "gradient" in comps
    [failure] = p.failures
    assert failure.stage == "register:proposer" and "AbstractProposer" in failure.error
    with pytest.raises(PluginError):
        ev3core.load_plugins(
            extra=[_BadRegistration()], autoload=False, raise_errors=True
        ).components("proposer")


class _UnknownHook:
    @ev3core.hookimpl
    def ev3_no_such_hook(self):
        return None


def test_plugin_with_unknown_hook_is_rejected():
    p = ev3core.load_plugins(extra=[_UnknownHook()], autoload=False)
    assert p.failures and "ev3_no_such_hook" in p.failures[0].error


def _grad(**kw):
    return ev3core.GradientProposer(
        losses=[ev3core.CrossEntropy()], optimizers=[optax.sgd(0.1)], steps=3, batch_size=8, **kw
    )


class _StageWrapper:
    """Adds a second proposer to every pipeline and an objective, via hook wrappers."""

    @ev3core.hookimpl(wrapper=True)
    def ev3_explore(self, proposers):
        result = yield
        return result + (_grad(),)

    @ev3core.hookimpl(wrapper=True)
    def ev3_assess(self, assessors):
        result = yield
        return result + (ev3core.NegCrossEntropy(),)


def test_stage_hooks_resolve_stages_at_build_time(builtin_plugins):
    p = ev3core.load_plugins(extra=[_StageWrapper()], autoload=False)
    engine = ev3core.Pipeline(
        [_grad()], ["accuracy"], plugins=p, assess_size=8, decide_size=8
    ).build()
    assert len(engine.proposers) == 2 and engine.num_candidates == 2
    assert engine.objective_names == ("accuracy", "neg_cross_entropy")
    plain = ev3core.Pipeline([_grad()], plugins=builtin_plugins).build()
    assert len(plain.proposers) == 1


def test_components_by_name_class_and_instance(builtin_plugins):
    p = builtin_plugins
    engine = ev3core.Pipeline(
        [
            p.make(
                "proposer",
                "gradient",
                losses=[p.make("loss", "cross_entropy")],
                optimizers=[optax.adam(1e-2)],
                steps=2,
                batch_size=4,
            )
        ],
        assessors=["accuracy", ev3core.NegCrossEntropy],
        scheduler="always_accept",
        plugins=p,
    ).build()
    assert isinstance(engine.scheduler, ev3core.AlwaysAccept)
    assert isinstance(engine.assessors[1], ev3core.NegCrossEntropy)


class _Recorder:
    def __init__(self):
        self.calls = []

    @ev3core.hookimpl
    def ev3_run_start(self, num_steps):
        self.calls.append(("start", num_steps))

    @ev3core.hookimpl
    def ev3_after_step(self, info, step):
        self.calls.append(("step", step, int(info.step)))

    @ev3core.hookimpl
    def ev3_run_end(self, infos):
        self.calls.append(("end", len(infos)))


@pytest.mark.parametrize("chunk", [1, 2])
def test_lifecycle_hooks_are_called_between_steps(chunk, tiny_problem):
    rec = _Recorder()
    p = ev3core.load_plugins(extra=[rec], autoload=False)
    data, model = tiny_problem
    engine = ev3core.Pipeline([_grad()], plugins=p, assess_size=8, decide_size=16).build()
    state = engine.init(model, jax.random.key(0))
    state, infos = ev3core.run(engine, state, data, 3, plugins=p, chunk=chunk)
    assert rec.calls == [("start", 3), ("step", 0, 0), ("step", 1, 1), ("step", 2, 2), ("end", 3)]
    assert ev3core.choice_index(infos.choice).shape == (3,) and int(state.step) == 3


class _Crasher:
    @ev3core.hookimpl
    def ev3_after_step(self, step):
        if step == 1:
            raise RuntimeError("disk full")


def test_failing_lifecycle_plugin_stops_the_run_naming_it(tiny_problem):
    p = ev3core.load_plugins(extra=[_Crasher()], autoload=False)
    data, model = tiny_problem
    engine = ev3core.Pipeline([_grad()], plugins=p, assess_size=8, decide_size=16).build()
    state = engine.init(model, jax.random.key(0))
    with pytest.raises(PluginError) as err:
        ev3core.run(engine, state, data, 3, plugins=p)
    assert "_Crasher" in str(err.value) and "disk full" in str(err.value)
