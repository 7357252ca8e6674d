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
]


class EV3Error(Exception):
    """Base class of every error that ev3core raises on purpose."""


class ConfigurationError(EV3Error, ValueError):
    """A pipeline, component or data set was configured with an invalid value."""


class PluginError(EV3Error):
    """A plugin failed to import or to register its components."""


class DuplicateComponentError(PluginError):
    """Two plugins registered a component of the same kind under the same name."""


class UnknownComponentError(EV3Error, KeyError):
    """A component was asked for by a name that no loaded plugin registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""
