"""Plugin manager: built-in and entry-point plugins, and the registry of named components.

Environment variables (read when plugins are loaded):

- `EV3_DISABLE_PLUGIN_AUTOLOAD=1`: do not load entry-point plugins (built-ins still load).
- `EV3_LOAD_PLUGINS=a,b`: load only the entry-point plugins named `a` and `b`.
- `EV3_RAISE_PLUGIN_ERRORS=1`: a plugin that fails to import or register raises instead of
  being reported and skipped.
- `EV3_TRACE_PLUGINS=1`: write every plugin registration and hook call to stderr (see
  `Plugins.trace`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import logging
import os
import sys
import traceback
import types
from collections.abc import Callable, Iterable
from typing import Any

import pluggy

from .. import hookspecs
from .._adapt.bounds import AbstractBound
from .._adapt.priorities import AbstractPriority
from .._interfaces import AbstractAssessor, AbstractLoss, AbstractProposer, AbstractScheduler
from ..errors import (
    ConfigurationError,
    DuplicateComponentError,
    EV3Error,
    PluginError,
    UnknownComponentError,
)

logger = logging.getLogger("ev3core")

ENTRY_POINT_GROUP = "ev3"

#: ev3core's own plugins, imported by name when plugins are loaded (as pytest loads its
#: built-in plugins): the components, and the host's experiments and observers (which sit
#: above this module, so it cannot import them).
BUILTIN_PLUGINS = (
    "ev3core._plugins.builtins",
    "ev3core._host.experiments",
    "ev3core._host.observe",
)

#: kind -> (registration hook name, base class; `None`: any callable, e.g. an experiment or
#: an observer factory)
KINDS: dict[str, tuple[str, type | None]] = {
    "proposer": ("ev3_register_proposers", AbstractProposer),
    "assessor": ("ev3_register_assessors", AbstractAssessor),
    "scheduler": ("ev3_register_schedulers", AbstractScheduler),
    "loss": ("ev3_register_losses", AbstractLoss),
    "bound": ("ev3_register_bounds", AbstractBound),
    "priority": ("ev3_register_priorities", AbstractPriority),
    "experiment": ("ev3_register_experiments", None),
    "observer": ("ev3_register_observers", None),
}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclasses.dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be imported or could not register its components."""

    name: str
    distribution: str | None
    stage: str  # "import", "register" or "register:<kind>"
    error: str
    traceback: str

    def __str__(self) -> str:
        dist = f" (from {self.distribution})" if self.distribution else ""
        return f"plugin {self.name!r}{dist} failed during {self.stage}: {self.error}"


@dataclasses.dataclass(frozen=True)
class ComponentInfo:
    kind: str
    name: str
    cls: Any  # a class; for experiments, any callable
    plugin: str


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]


class Plugins:
    """A loaded set of plugins and the registry of the components they provide.

    Use `ev3core.plugin_manager()` for the default, cached instance, or
    `ev3core.load_plugins()` for a fresh one (for instance with extra plugin objects in tests).
    """

    def __init__(self, raise_errors: bool = False):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.raise_errors = raise_errors
        self.failures: list[PluginFailure] = []
        self._dists: dict[str, tuple[str | None, str | None]] = {}
        self._registry: dict[str, dict[str, ComponentInfo]] = {}
        self._hooktrace = self.pm.trace.root.get("hook")
        self._untrace: Callable[[], None] | None = None

    # ------------------------------------------------------------ tracing
    @property
    def tracing(self) -> bool:
        """Whether hook calls are being traced (`trace()` or `EV3_TRACE_PLUGINS=1`)."""
        return self._untrace is not None

    def trace(self, writer: Callable[[str], object] | None = None) -> Callable[[], None]:
        """Write every hook call, and every plugin registration, to `writer` (default: stderr).

        Uses pluggy's own tracing (`PluginManager.trace` and `add_hookcall_monitoring`), with
        arguments and results summarised (type names, lengths, component names) rather than
        printed in full. Registration hooks, which ev3core calls one plugin at a time, are
        traced with the names each plugin registered.

        **Returns:** a function that stops the tracing.
        """
        if writer is None:
            writer = _write_stderr
        self.pm.trace.root.setwriter(writer)
        if self._untrace is None:
            hooktrace = self._hooktrace

            def before(hook_name: str, impls: Any, kwargs: Any) -> None:
                args = ", ".join(f"{k}={_brief(v)}" for k, v in kwargs.items())
                order = ", ".join(i.plugin_name for i in reversed(impls)) or "(none)"
                hooktrace(f"{hook_name}({args}) -> calls {order}")
                hooktrace.root.indent += 1

            def after(outcome: Any, hook_name: str, impls: Any, kwargs: Any) -> None:
                hooktrace.root.indent -= 1
                if outcome.exception is not None:
                    exc = outcome.exception
                    hooktrace(f"{hook_name} raised {type(exc).__name__}: {exc}")
                elif hook_name not in _QUIET_RESULTS:
                    hooktrace(f"{hook_name} returned {_brief(outcome.get_result())}")

            undo = self.pm.add_hookcall_monitoring(before, after)

            def untrace() -> None:
                undo()
                self.pm.trace.root.setwriter(None)
                self._untrace = None

            self._untrace = untrace
        return self._untrace

    def _trace(self, message: str) -> None:
        if self._untrace is not None:
            self._hooktrace(message)

    # ------------------------------------------------------------ listing
    def describe(self) -> dict[str, Any]:
        """Every plugin (name, distribution, version, hooks, components) and every failure.

        This is what `ev3 plugins --json` prints. Building the component lists calls the
        registration hooks, so a plugin failing there appears under `failures`.
        """
        comps = {kind: self.components(kind) for kind in KINDS}
        entries = []
        for info in self.plugin_infos():
            entries.append(
                {
                    "name": info.name,
                    "distribution": info.distribution,
                    "version": info.version,
                    "hooks": list(info.hooks),
                    "components": [
                        {"kind": kind, "name": c.name}
                        for kind in KINDS
                        for c in comps[kind].values()
                        if c.plugin == info.name
                    ],
                }
            )
        failures = [
            {"name": f.name, "distribution": f.distribution, "stage": f.stage, "error": f.error}
            for f in self.failures
        ]
        return {"plugins": entries, "failures": failures}

    # ------------------------------------------------------------ loading
    def _fail(self, name: str, dist: str | None, stage: str, exc: BaseException) -> None:
        failure = PluginFailure(
            name=name,
            distribution=dist,
            stage=stage,
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
        )
        if self.raise_errors:
            cls = type(exc) if isinstance(exc, PluginError) else PluginError
            raise cls(str(failure)) from exc
        self.failures.append(failure)
        logger.warning("ev3core: %s (skipped; set EV3_RAISE_PLUGIN_ERRORS=1 to raise)", failure)

    def register(
        self, plugin: Any, name: str | None = None, distribution: tuple[str, str] | None = None
    ) -> str | None:
        """Register a plugin object (module or instance with hookimpls).

        A plugin whose hook implementations do not match the specifications is reported
        and skipped (or raises with `EV3_RAISE_PLUGIN_ERRORS=1`).
        """
        if name is None:
            if isinstance(plugin, types.ModuleType):
                name = plugin.__name__
            else:  # an instance: name it after its class, unique per instance
                name = f"{type(plugin).__module__}.{type(plugin).__qualname__}"
                if self.pm.has_plugin(name):
                    name = f"{name}-{id(plugin):x}"
        dist_name = distribution[0] if distribution else None
        try:
            unknown = [
                attr
                for attr in dir(plugin)
                if attr.startswith("ev3_")
                and self.pm.parse_hookimpl_opts(plugin, attr) is not None
                and not hasattr(self.pm.hook, attr)
            ]
            if unknown:
                raise PluginError(
                    f"implements unknown hook(s) {unknown}; known hooks are "
                    f"{hookspecs._all_hook_names()}"
                )
            registered = self.pm.register(plugin, name=name)
        except BaseException as exc:  # noqa: BLE001 - reported, never fatal by default
            self._fail(name, dist_name, "register", exc)
            return None
        if self._untrace is not None:
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            self._trace(
                f"register plugin {name}"
                + (f" ({distribution[0]} {distribution[1]})" if distribution else "")
                + f": {', '.join(hooks) or 'no hooks'}"
            )
        self._dists[name] = distribution or (None, None)
        self._registry.clear()
        return registered

    def load_entry_points(self, only: Iterable[str] | None = None) -> None:
        """Import and register every plugin of the `ev3` entry-point group."""
        allow = set(only) if only is not None else None
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if allow is not None and ep.name not in allow:
                continue
            if self.pm.has_plugin(ep.name) or self.pm.is_blocked(ep.name):
                continue
            dist = (ep.dist.name, ep.dist.version) if ep.dist is not None else None
            try:
                plugin = ep.load()
            except BaseException as exc:  # noqa: BLE001
                # Also SystemExit and KeyboardInterrupt: a plugin calling sys.exit() at import
                # must not end every `ev3` command; it is that plugin's failure.
                self._fail(ep.name, dist[0] if dist else None, "import", exc)
                continue
            self.register(plugin, name=ep.name, distribution=dist)

    def call_hook(self, name: str, /, **kwargs: Any) -> Any:
        """Call the hook `name`; an exception from a plugin's implementation is re-raised as
        `PluginError` naming that plugin and the hook (errors of ev3core's own types pass
        through unchanged)."""
        caller = getattr(self.pm.hook, name)
        try:
            return caller(**kwargs)
        except EV3Error:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {hook_culprit(caller, exc)!r} raised in {name}: "
                f"{type(exc).__name__}: {exc}. Fix or uninstall that plugin "
                "(`ev3 plugins` lists plugins and their hooks)."
            ) from exc

    # ------------------------------------------------------------ introspection
    def plugin_infos(self) -> list[PluginInfo]:
        """Every registered plugin with its distribution, version and implemented hooks."""
        out = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or []))
            dist, version = self._dists.get(name, (None, None))
            out.append(PluginInfo(name=name, distribution=dist, version=version, hooks=hooks))
        return out

    # ------------------------------------------------------------ registry
    def _build(self, kind: str) -> dict[str, ComponentInfo]:
        hook_name, base = KINDS[kind]
        caller = getattr(self.pm.hook, hook_name)
        found: dict[str, ComponentInfo] = {}
        # get_hookimpls() lists implementations in registration order.
        for impl in caller.get_hookimpls():
            try:
                result = impl.function() or {}
                if not isinstance(result, dict):
                    raise PluginError(
                        f"{hook_name} must return a dict of name -> class, got "
                        f"{type(result).__name__}"
                    )
                for comp_name, cls in result.items():
                    if base is None:
                        if not callable(cls):
                            raise PluginError(
                                f"{hook_name} registered {comp_name!r} -> {cls!r}, which is "
                                "not callable"
                            )
                    elif not (isinstance(cls, type) and issubclass(cls, base)):
                        raise PluginError(
                            f"{hook_name} registered {comp_name!r} -> {cls!r}, which is not a "
                            f"subclass of ev3core.{base.__name__}"
                        )
            except BaseException as exc:  # noqa: BLE001
                dist = self._dists.get(impl.plugin_name, (None, None))[0]
                self._fail(impl.plugin_name, dist, f"register:{kind}", exc)
                continue
            for comp_name, cls in result.items():
                if comp_name in found:
                    # The name stays with the plugin that registered it first; the later
                    # plugin fails for this name only (its other components still load).
                    prev = found[comp_name]
                    dist = self._dists.get(impl.plugin_name, (None, None))[0]
                    self._fail(
                        impl.plugin_name,
                        dist,
                        f"register:{kind}",
                        DuplicateComponentError(
                            f"The {kind} name {comp_name!r} is registered twice: by plugin "
                            f"{prev.plugin!r} ({_qualname(prev.cls)}) and by plugin "
                            f"{impl.plugin_name!r} ({_qualname(cls)}); the name stays with "
                            f"{prev.plugin!r}. Uninstall or disable one of them "
                            "(EV3_LOAD_PLUGINS=... loads only the plugins you name), or ask one "
                            "author to rename the component."
                        ),
                    )
                    continue
                found[comp_name] = ComponentInfo(kind, comp_name, cls, impl.plugin_name)
            self._trace(f"{hook_name}() [{impl.plugin_name}] -> {sorted(result) or '{}'}")
        return found

    def components(self, kind: str) -> dict[str, ComponentInfo]:
        """All registered components of `kind` (`"proposer"`, `"assessor"`, ...)."""
        if kind not in KINDS:
            raise UnknownComponentError(
                f"Unknown component kind {kind!r}. Kinds are: {', '.join(KINDS)}."
            )
        if kind not in self._registry:
            self._registry[kind] = self._build(kind)
        return self._registry[kind]

    def get(self, kind: str, name: str) -> Any:
        """The component class registered as `name`; an error with close matches otherwise."""
        comps = self.components(kind)
        if name in comps:
            return comps[name].cls
        close = difflib.get_close_matches(name, list(comps), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        available = ", ".join(sorted(comps)) or "(none)"
        raise UnknownComponentError(
            f"No {kind} named {name!r}.{hint} Registered {kind}s: {available}. Use one of "
            "these names, or install the plugin that provides it (`ev3 plugins` lists the "
            "installed plugins and what they register)."
        )

    def make(self, kind: str, name: str, /, **kwargs: Any) -> Any:
        """Instantiate the component registered as `name` with `kwargs`."""
        return self.get(kind, name)(**kwargs)

    def resolve(self, kind: str, spec: Any, owner: str | None = None) -> Any:
        """A component from a registered name (default arguments), a class (instantiated with
        no arguments) or an instance (returned as is); `owner` prefixes error messages."""
        if isinstance(spec, str):
            try:
                return self.make(kind, spec)
            except TypeError as exc:
                who = f"{owner}: the" if owner else "The"
                raise ConfigurationError(
                    f"{who} {kind} {spec!r} needs arguments ({exc}). Build it with "
                    f"ev3core.make({kind!r}, {spec!r}, ...) or its class and pass the instance."
                ) from exc
        if isinstance(spec, type):
            return spec()
        return spec


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def hook_culprit(hook_caller: Any, exc: BaseException) -> str:
    """The name of the plugin whose implementation of `hook_caller` raised `exc`."""
    codes = {
        impl.function.__code__: impl.plugin_name
        for impl in hook_caller.get_hookimpls()
        if hasattr(impl.function, "__code__")
    }
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code in codes:
            return codes[frame.f_code]
    return "<unknown plugin>"


def load_plugins(
    *,
    extra: Iterable[Any] = (),
    autoload: bool | None = None,
    only: Iterable[str] | None = None,
    raise_errors: bool | None = None,
    trace: bool | None = None,
) -> Plugins:
    """Load the built-in plugin, entry-point plugins and `extra` plugin objects.

    **Arguments:**

    - `extra`: plugin objects (modules or instances) to register after the others.
    - `autoload`: load entry points (default: unless `EV3_DISABLE_PLUGIN_AUTOLOAD=1`).
    - `only`: entry-point names to load (default: `EV3_LOAD_PLUGINS` if set, else all).
    - `raise_errors`: raise on a failing plugin (default: `EV3_RAISE_PLUGIN_ERRORS=1`).
    - `trace`: write plugin registrations and hook calls to stderr (default:
      `EV3_TRACE_PLUGINS=1`; see `Plugins.trace`).
    """
    if raise_errors is None:
        raise_errors = _env_flag("EV3_RAISE_PLUGIN_ERRORS")
    if autoload is None:
        autoload = not _env_flag("EV3_DISABLE_PLUGIN_AUTOLOAD")
    if only is None and os.environ.get("EV3_LOAD_PLUGINS", "").strip():
        only = [s.strip() for s in os.environ["EV3_LOAD_PLUGINS"].split(",") if s.strip()]
    plugins = Plugins(raise_errors=raise_errors)
    if trace if trace is not None else _env_flag("EV3_TRACE_PLUGINS"):
        plugins.trace()
    for module in BUILTIN_PLUGINS:
        # ev3core.builtins, ev3core.experiments, ev3core.observe
        name = "ev3core." + module.rpartition(".")[2]
        plugins.register(
            importlib.import_module(module), name=name, distribution=_own_distribution()
        )
    if autoload:
        plugins.load_entry_points(only=only)
    for obj in extra:
        plugins.register(obj)
    return plugins


#: Hooks whose results are not worth tracing (lifecycle hooks return nothing).
_QUIET_RESULTS = frozenset({"ev3_run_start", "ev3_after_step", "ev3_run_end"})


def _write_stderr(text: str) -> None:
    sys.stderr.write(f"ev3 trace: {text}")
    sys.stderr.flush()


def _brief(value: Any, depth: int = 0) -> str:
    """A one-line summary of a hook argument or result (type names, not full reprs)."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, (tuple, list)):
        if depth > 0 or len(value) > 8:
            return f"{type(value).__name__}[{len(value)}]"
        inner = ", ".join(_brief(v, depth + 1) for v in value)
        return (
            f"({inner},)"
            if isinstance(value, tuple) and len(value) == 1
            else (f"({inner})" if isinstance(value, tuple) else f"[{inner}]")
        )
    if isinstance(value, dict):
        return f"dict[{len(value)}]"
    return type(value).__name__


def _own_distribution() -> tuple[str, str] | None:
    try:
        return ("ev3core", importlib.metadata.version("ev3core"))
    except importlib.metadata.PackageNotFoundError:
        return None


_DEFAULT: Plugins | None = None


def plugin_manager() -> Plugins:
    """The default plugin set, loaded once per process (see `load_plugins`)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_plugins()
    return _DEFAULT


def make(kind: str, name: str, /, **kwargs: Any) -> Any:
    """Instantiate a registered component by kind and name from the default plugins.

    ```python
    proposer = ev3core.make("proposer", "gradient", losses=[...], optimizers=[...])
    ```
    """
    return plugin_manager().make(kind, name, **kwargs)
