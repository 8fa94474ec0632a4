"""Registries: names -> factories for averagers, tasks and evaluators.

Built-ins register themselves with a decorator in their own file (timm style); the registry finds them
by importing every public module of its built-in package on first use, so adding a file touches no
existing file. Third-party packages join through entry-point groups (``lawa_suite.averagers`` etc.,
value ``package.module:Class``); their names are known from metadata without importing them, and a
plugin is imported only when it is asked for (or listed). A plugin that fails to import, has the wrong
shape, or claims a name someone else already has is reported by name and distribution; it never breaks
the other plugins or the CLI.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from lawa_suite.errors import PluginError, RegistryError, UnknownNameError
from lawa_suite.files import first_line

__all__ = ["Registry", "PluginInfo", "RegistryError", "UnknownNameError", "PluginError", "class_contract_problem",
           "averagers", "tasks", "evaluators"]


@dataclass
class PluginInfo:
    """What `suite list` shows for one name."""
    name: str
    kind: str
    source: str                      # "built-in lawa_suite.averagers.lawa" or "entry point foo = pkg.mod:Cls"
    distribution: str | None = None  # "name version" of the installing distribution, for entry points
    error: str | None = None         # why it cannot be used, if it cannot
    obj: Any = None                  # the loaded factory, once loaded

    @property
    def ok(self) -> bool:
        return self.error is None


def class_contract_problem(obj: Any, kind: str, members: tuple[str, ...], base: str) -> str | None:
    """The checks every kind shares: ``obj`` is a class, has every member its users call, a dataclass
    ``Config`` when that is a member, and no method left abstract. ``base`` is the class to subclass."""
    import dataclasses

    name = getattr(obj, "__qualname__", repr(obj))
    if not isinstance(obj, type):
        return f"{name} is not a class (expected a subclass of {base})"
    missing = [member for member in members if not hasattr(obj, member)]
    if missing:
        return f"{name} lacks the {kind} interface (no {', '.join(missing)}); subclass {base}"
    if "Config" in members and not dataclasses.is_dataclass(obj.Config):
        return f"{name}.Config is not a dataclass (its fields are the {kind}'s keys)"
    abstract = sorted(getattr(obj, "__abstractmethods__", ()))
    return f"{name} does not implement {', '.join(abstract)}" if abstract else None


def _short_exc(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__


def _load_guarded(load: Callable[[], Any]) -> tuple[Any, str | None]:
    """Run an import; any failure (SystemExit from a plugin included) becomes an error string."""
    try:
        return load(), None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a plugin may raise anything, even SystemExit
        return None, _short_exc(exc)


class Registry:
    """Maps names to factories of one kind (averager, task or evaluator).

    Args:
        kind: what the registered things are, for messages ("averager").
        group: the entry-point group third-party packages use ("lawa_suite.averagers").
        builtin_package: the package whose modules register the built-ins ("lawa_suite.averagers").
        contract: ``"module:function"`` of the check that a factory has the whole interface its users call
            (``function(obj) -> problem or None``), imported on first use; the kind's base module owns it.
    """

    def __init__(self, kind: str, group: str, builtin_package: str, contract: str = ""):
        self.kind = kind
        self.group = group
        self.builtin_package = builtin_package
        self.contract = contract
        self._builtins: dict[str, PluginInfo] = {}
        self._plugins: dict[str, list[PluginInfo]] = {}
        self._broken_modules: list[PluginInfo] = []
        self._discovered = False
        self._loading_builtins = False

    # -- registration -------------------------------------------------------------------------------
    def register(self, name: str | None = None) -> Callable[[Any], Any]:
        """Decorator: ``@registry.averagers.register("lawa")`` on a class or factory function."""

        def decorate(obj: Any) -> Any:
            key = name or getattr(obj, "name", None) or obj.__name__.lower()
            module = getattr(obj, "__module__", "?")
            known = self._builtins.get(key)
            if known is not None and known.obj is not obj and known.source != f"built-in {module}":
                raise PluginError(f"{self.kind} '{key}' is registered twice: by {known.source} "
                                  f"and by {module}.{obj.__qualname__}")
            problem = self._interface_problem(obj)
            source = f"built-in {module}" if module.startswith(self.builtin_package) else f"module {module}"
            self._builtins[key] = PluginInfo(key, self.kind, source, error=problem, obj=obj)
            return obj

        return decorate

    def _interface_problem(self, obj: Any) -> str | None:
        if not callable(obj):
            return f"{obj!r} is not a class or function"
        if not self.contract:
            return None
        module, _, function = self.contract.partition(":")
        return getattr(importlib.import_module(module), function)(obj)

    # -- discovery ----------------------------------------------------------------------------------
    def _discover(self) -> None:
        if self._discovered or self._loading_builtins:
            return
        self._loading_builtins = True
        try:
            package = importlib.import_module(self.builtin_package)
            for module in pkgutil.iter_modules(package.__path__):
                if module.name.startswith("_") or module.name == "base":
                    continue
                full = f"{self.builtin_package}.{module.name}"
                _, error = _load_guarded(lambda full=full: importlib.import_module(full))
                if error:
                    self._broken_modules.append(PluginInfo(module.name, self.kind, f"built-in {full}", error=error))
            self._discover_entry_points()
        finally:
            self._loading_builtins = False
            self._discovered = True

    def _discover_entry_points(self) -> None:
        seen: set[tuple[str, str]] = set()
        for ep in importlib.metadata.entry_points(group=self.group):
            if (ep.name, ep.value) in seen:  # the same distribution found twice on sys.path
                continue
            seen.add((ep.name, ep.value))
            dist = getattr(ep, "dist", None)
            dist_name = f"{dist.metadata['Name']} {dist.version}" if dist is not None else None
            info = PluginInfo(ep.name, self.kind, f"entry point {ep.name} = {ep.value}", distribution=dist_name)
            info._entry_point = ep  # type: ignore[attr-defined]
            self._plugins.setdefault(ep.name, []).append(info)

    def _load_plugin(self, info: PluginInfo) -> None:
        if info.obj is not None or info.error is not None:
            return
        obj, error = _load_guarded(info._entry_point.load)  # type: ignore[attr-defined]
        info.obj, info.error = obj, error or (self._interface_problem(obj) if obj is not None else None)
        if info.error and info.distribution:
            info.error = f"{info.error} (distribution {info.distribution})"

    def _conflict(self, name: str) -> str | None:
        claims = [f"{p.source} ({p.distribution})" if p.distribution else p.source for p in self._plugins.get(name, [])]
        if name in self._builtins:
            claims.insert(0, self._builtins[name].source)
        if len(claims) > 1:
            return f"{self.kind} name '{name}' is claimed by {len(claims)} plugins: " + "; ".join(claims)
        return None

    # -- lookup -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every registered name, built-in and third-party, sorted; importing no third-party plugin."""
        self._discover()
        return sorted(set(self._builtins) | set(self._plugins))

    def get(self, name: str) -> Any:
        """The factory registered under ``name``; a clear one-line error if there is none or it is broken."""
        self._discover()
        conflict = self._conflict(name)
        if conflict:
            raise PluginError(conflict)
        if name in self._builtins:
            info = self._builtins[name]
        elif name in self._plugins:
            info = self._plugins[name][0]
            self._load_plugin(info)
        else:
            raise UnknownNameError(self.unknown_message(name))
        if info.error:
            raise PluginError(f"{self.kind} '{name}' from {info.source} cannot be used: {info.error}")
        return info.obj

    def create(self, name: str, **kwargs: Any) -> Any:
        """``get(name)(**kwargs)``."""
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def unknown_message(self, name: str) -> str:
        """``unknown <kind> '<name>'; known: ...; did you mean ...?``: one line."""
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown {self.kind} '{name}'; known: {', '.join(known) or '(none)'}{hint}"

    def describe(self) -> list[PluginInfo]:
        """One entry per name (loading every plugin), plus built-in modules that failed to import."""
        self._discover()
        rows: list[PluginInfo] = []
        for name in self.names():
            conflict = self._conflict(name)
            if name in self._builtins:
                info = self._builtins[name]
            else:
                info = self._plugins[name][0]
                self._load_plugin(info)
            if conflict:
                info = PluginInfo(name, self.kind, info.source, info.distribution, error=conflict, obj=info.obj)
            rows.append(info)
        return rows + list(self._broken_modules)

    def reset(self) -> None:
        """Forget discovered plugins (tests use this after changing sys.path); built-ins stay."""
        self._plugins.clear()
        self._broken_modules.clear()
        self._discovered = False


averagers = Registry("averager", "lawa_suite.averagers", "lawa_suite.averagers",
                     contract="lawa_suite.averagers.base:contract_problem")
tasks = Registry("task", "lawa_suite.tasks", "lawa_suite.tasks", contract="lawa_suite.tasks.base:contract_problem")
evaluators = Registry("evaluator", "lawa_suite.evaluators", "lawa_suite.evaluators",
                      contract="lawa_suite.evaluators.base:contract_problem")
