"""The plugin manager: built-in plugins by module name, third-party ones from the ``mergebench`` entry points."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from typing import Any, Callable

import pluggy

from mergebench.core import hookspecs
from mergebench.core.errors import InputError, PluginError
from mergebench.core.registry import MergeMethod, Registry

ENTRY_POINT_GROUP = "mergebench"
LOAD_PLUGINS_ENV = "MERGEBENCH_LOAD_PLUGINS"
# importable modules registered as plugins without installing them (development and tests, like pytest's -p)
PLUGIN_MODULES_ENV = "MERGEBENCH_PLUGINS"

BUILTIN_PLUGINS = (
    "mergebench.study.components",  # the study's component kinds (no hooks of its own)
    "mergebench.core.sources",
    "mergebench.plugins.average",
    "mergebench.plugins.task_vectors",
    "mergebench.plugins.linear",
    "mergebench.plugins.nearswap",
    "mergebench.plugins.spherical",
    "mergebench.plugins.model_stock",
    "mergebench.plugins.sce",
    "mergebench.plugins.ram",
    "mergebench.plugins.arcee_fusion",
    "mergebench.plugins.regmean",
    "mergebench.plugins.fisher",
    "mergebench.plugins.subspace",
    "mergebench.plugins.base_preparers",
    "mergebench.plugins.expert_trainers",
    "mergebench.plugins.hf_trainer",
    "mergebench.evaluators.lm_eval_adapter",
    "mergebench.study.executors",
    "mergebench.suites.micro_t0",
    "mergebench.suites.t0_paper",
)

# hook name -> (registry kind, component class); the study adds its kinds (mergebench.study.components)
REGISTRATION_HOOKS: dict[str, tuple[str, type]] = {
    "register_merge_methods": ("merge method", MergeMethod),
}


def add_component_kind(hook_name: str, kind: str, cls: type) -> None:
    """Declare that components registered through ``hook_name`` are ``cls`` instances called ``kind``."""
    REGISTRATION_HOOKS[hook_name] = (kind, cls)


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus component registries built from the registration hooks."""

    def __init__(self) -> None:
        super().__init__("mergebench")
        self.add_hookspecs(hookspecs)
        self.distributions: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self._registries: dict[str, Registry] = {}

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        self._registries.clear()
        return super().register(plugin, name)

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        self._registries.clear()
        return super().unregister(plugin, name)

    def registry(self, hook_name: str) -> Registry:
        """All components registered through ``hook_name``, attributed to the plugin that registered each."""
        if hook_name not in self._registries:
            kind, cls = REGISTRATION_HOOKS[hook_name]
            registry: Registry = Registry(kind, cls)
            for impl in getattr(self.hook, hook_name).get_hookimpls():
                register: Callable[[Any], None] = lambda item, _p=impl.plugin_name: registry.register(item, _p)
                impl.function(**({"register": register} if "register" in impl.argnames else {}))
            self._registries[hook_name] = registry
        return self._registries[hook_name]

    def merge_methods(self) -> Registry[MergeMethod]:
        return self.registry("register_merge_methods")

    def base_preparers(self) -> Registry:
        return self.registry("register_base_preparers")

    def expert_trainers(self) -> Registry:
        return self.registry("register_expert_trainers")

    def evaluators(self) -> Registry:
        return self.registry("register_evaluators")

    def suites(self) -> Registry:
        return self.registry("register_suites")

    def executors(self) -> Registry:
        return self.registry("register_executors")

    def resolve_model(self, reference: str, allow_pickle: bool = False):
        source = self.hook.resolve_model(reference=str(reference), allow_pickle=allow_pickle)
        if source is None:
            raise InputError(f"{reference}: no plugin could open this model reference")
        return source

    def describe_plugins(self) -> list[dict[str, Any]]:
        """Name, hooks implemented and (for installed plugins) distribution and version, per plugin."""
        rows = []
        for plugin in self.get_plugins():
            name = self.get_name(plugin) or repr(plugin)
            hooks = sorted(caller.name for caller in self.get_hookcallers(plugin) or [])
            row: dict[str, Any] = {"name": name, "hooks": hooks}
            if name in self.distributions:
                row["distribution"], row["version"] = self.distributions[name]
            else:
                row["builtin"] = True
            rows.append(row)
        return sorted(rows, key=lambda r: (not r.get("builtin", False), r["name"]))


def load_entry_point_plugins(pm: PluginManager, allowed: set[str] | None) -> None:
    """Register third-party plugins from the ``mergebench`` entry-point group.

    ``allowed`` restricts them by distribution or entry-point name (None: all). Unlike pluggy's own
    loader, a second entry point with an already-used name is an error, not silently skipped.
    """
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown distribution"
        version = ep.dist.version if ep.dist is not None else "?"
        if allowed is not None and dist not in allowed and ep.name not in allowed:
            continue
        if pm.has_plugin(ep.name):
            other = pm.distributions.get(ep.name, ("mergebench (built in)",))[0]
            raise PluginError(
                f"two plugins use the name '{ep.name}': one from {other} and one from {dist}; "
                f"uninstall one or choose with {LOAD_PLUGINS_ENV}"
            )
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not show a traceback
            raise PluginError(f"plugin '{ep.name}' from {dist} failed to load: {exc}") from None
        pm.register(plugin, name=ep.name)
        pm.distributions[ep.name] = (dist, version)


def make_plugin_manager(entry_points: bool = True) -> PluginManager:
    """A fresh manager with the built-in plugins and, unless disabled, the installed ones.

    ``MERGEBENCH_LOAD_PLUGINS=a,b`` loads only those third-party plugins; an empty value loads none.
    ``MERGEBENCH_PLUGINS=pkg.mod,other`` also registers those importable modules (not installed: development).
    """
    pm = PluginManager()
    for module in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module), name=module)
    if entry_points:
        env = os.environ.get(LOAD_PLUGINS_ENV)
        allowed = None if env is None else {s.strip() for s in env.split(",") if s.strip()}
        load_entry_point_plugins(pm, allowed)
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGIN_MODULES_ENV, "").split(","))):
        if pm.has_plugin(module):
            continue
        try:
            plugin = importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not show a traceback
            raise PluginError(f"plugin module '{module}' (from {PLUGIN_MODULES_ENV}) failed to import: {exc}") from None
        pm.register(plugin, name=module)
    return pm


_default: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager, created on first use."""
    global _default
    if _default is None:
        _default = make_plugin_manager()
    return _default


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests, or after changing MERGEBENCH_LOAD_PLUGINS)."""
    global _default
    _default = None
