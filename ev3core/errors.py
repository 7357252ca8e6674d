"""Exceptions raised by ev3core on the host side.

Every message names the component, the bad value and the fix. Failures inside
compiled code use `equinox.error_if` instead (see the engine).
"""

from __future__ import annotations

__all__ = [
    "EV3Error",
    "ConfigurationError",
    "PluginError",
    "DuplicateComponentError",
    "UnknownComponentError",
    "ComponentError",
    "CheckpointError",
    "CheckpointWarning",
    "RunInterrupted",
]


class EV3Error(Exception):
    """Base class of every error that ev3core raises on purpose."""


class ConfigurationError(EV3Error, ValueError):
    """A pipeline, component or data set was configured with an invalid value."""


class PluginError(EV3Error):
    """A plugin failed to import or to register its components."""


class ComponentError(PluginError):
    """A component (proposer, assessor, scheduler) raised while the EV3 step was traced or run.

    The message names the component, its class and the plugin that registered it.
    """


class DuplicateComponentError(PluginError):
    """Two plugins registered a component of the same kind under the same name."""


class UnknownComponentError(ConfigurationError, KeyError):
    """A component, experiment or observer was asked for by a name that no loaded plugin
    registered. The message lists the registered names (and close matches); as a
    `ConfigurationError`, it is caught with the other configuration mistakes."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(EV3Error):
    """No usable checkpoint, or a checkpoint that does not fit the state it is loaded into."""


class CheckpointWarning(UserWarning):
    """A corrupt or incompatible checkpoint was skipped and an older one was used."""


class RunInterrupted(KeyboardInterrupt):
    """`ev3core.run` stopped cleanly at a step boundary after Ctrl-C (SIGINT) or SIGTERM.

    The lifecycle hooks (`ev3_run_end`, so checkpointers too) ran before it was raised.
    It is a `KeyboardInterrupt`, so scripts that do not catch it still stop.

    **Attributes:** `state` (the last consistent state), `infos` (the `StepInfo`s of the
    steps taken, stacked as by `run`, or `None`), `steps_done` and `signum` (the signal that
    stopped the run: 2 for SIGINT, 15 for SIGTERM), and `out`: the run directory to
    resume, when an experiment set it (else `None`).
    """

    def __init__(
        self,
        message: str,
        state: object = None,
        infos: object = None,
        steps_done: int = 0,
        signum: int | None = None,
    ):
        super().__init__(message)
        self.state = state
        self.infos = infos
        self.steps_done = steps_done
        self.signum = 2 if signum is None else int(signum)
        self.out: str | None = None
