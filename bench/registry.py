"""One small generic registry per plugin kind.

Recipes::

    # 1. register a plugin with a decorator: its name is the class's ``name`` (aliases allowed)
    from bench.registry import defenses
    @defenses.register()                 # or register("my-defense", "alias"): must include the class's name
    class MyDefense(Defense):
        name = "my-defense"

    # 2. register lazily, so that `import` stays cheap: the module is imported on first `get`
    defenses.register_lazy("params", "defenses.params:PaRaMS")

    # 3. look up by name; an unknown name says what is close and what exists
    cls = defenses.get("parms")   # UnknownPluginError: Unknown defense 'parms'. Did you mean 'params'? ...

Third-party packages register through the entry-point group ``mergearena.plugins``; each entry
point's value is a module (or ``module:callable``) that registers its plugins when imported, so a
plugin whose module was never imported by hand is still found by ``bench list`` and ``bench run``.

A registry of plugins checks what it is given: an object of the kind's base class (a `Defense`
subclass for `defenses`, ...), whose own ``name`` is among the names it is registered under (a lazy
entry's name is checked when it is imported). A plugin's name is then written once, on the class,
and a built-in's line in `bench.builtins` cannot silently point at another plugin.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")

ENTRY_POINT_GROUP = "mergearena.plugins"


class RegistryError(Exception):
    """A plugin could not be registered or found."""


class UnknownPluginError(RegistryError, KeyError):
    """Raised by `Registry.get` for a name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; a user should read a sentence
        return str(self.args[0])


class Registry(Generic[T]):
    """Named plugins of one kind; entries are objects or lazy ``"module:attr"`` placeholders.

    ``subclass_of`` / ``instance_of`` name the kind's base class as ``"module:Class"``. It is named, not
    imported: the modules defining the bases import this one, and a class derived from a base has that
    base in its MRO whether or not this module imported it. A registry with a base also checks names.
    """

    def __init__(self, kind: str, *, subclass_of: str | None = None, instance_of: str | None = None) -> None:
        self.kind = kind
        self.subclass_of, self.instance_of = subclass_of, instance_of
        self._entries: dict[str, T | str] = {}

    def register(self, *names: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``names`` (none: the object's own ``name``); without ``obj`` this is a decorator."""

        def add(target: T) -> T:
            self._check(target, names)
            for name in names or (getattr(target, "name", None),):
                if not isinstance(name, str) or not name:
                    raise RegistryError(f"{_describe(target)} has no name; register it under a name")
                self._add(name, target)
            return target

        return add if obj is None else add(obj)

    def _check(self, target: object, names: tuple[str, ...]) -> None:
        """Raise `RegistryError` unless ``target`` is of this registry's base and its name is among ``names``."""
        if self.subclass_of:
            if not (isinstance(target, type) and _derives(target, self.subclass_of)):
                raise RegistryError(f"a {self.kind} must be a subclass of {self.subclass_of.replace(':', '.')}; "
                                    f"got {_describe(target)}")
        elif self.instance_of:
            if not _derives(type(target), self.instance_of):
                raise RegistryError(f"a {self.kind} must be an instance of {self.instance_of.replace(':', '.')}; "
                                    f"got {_describe(target)}")
        else:
            return
        own = getattr(target, "name", None)
        if names and own not in names:
            raise RegistryError(
                f"{self.kind} {_describe(target)} is named {own!r} but registered as {', '.join(map(repr, names))}; "
                f"make them agree (register it with no name to use its own)"
            )

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``"module:attr"``, imported on first use."""
        if ":" not in target:
            raise RegistryError(f"lazy {self.kind} target must be 'module:attr', got {target!r}")
        self._add(name, target)

    def _add(self, name: str, target: T | str) -> None:
        current = self._entries.get(name)
        if current is not None and current is not target:
            # A lazy placeholder may be replaced by the object it names once that module imports.
            if isinstance(current, str) and not isinstance(target, str) and _importing(current):
                self._entries[name] = target
                return
            # The plugin's module was imported (and registered itself) before the built-in index.
            if isinstance(target, str) and not isinstance(current, str) and _names(target, current):
                return
            raise RegistryError(f"{self.kind} {name!r} is already registered ({_describe(current)})")
        self._entries[name] = target

    def get(self, name: str) -> T:
        """The plugin registered as ``name``, importing it if it was registered lazily."""
        discover_plugins()
        if name not in self._entries:
            close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownPluginError(
                f"Unknown {self.kind} {name!r}.{hint} Available: {', '.join(self.names()) or '(none)'}."
            )
        entry = self._entries[name]
        if isinstance(entry, str):
            module_name, attr = entry.split(":", 1)
            module = importlib.import_module(module_name)
            current = self._entries[name]  # importing may have registered the object itself
            if isinstance(current, str):
                try:
                    self._check(getattr(module, attr), (name,))
                except RegistryError as exc:
                    raise RegistryError(f"{self.kind} {name!r} ({entry}): {exc}") from None
            entry = current if not isinstance(current, str) else getattr(module, attr)
            self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        discover_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        discover_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


def _importing(placeholder: str) -> bool:
    """Whether the placeholder's module is (being) imported: only it may fill the placeholder."""
    return placeholder.split(":", 1)[0] in sys.modules


def _names(placeholder: str, obj: object) -> bool:
    """Whether the lazy ``"module:attr"`` placeholder names ``obj``."""
    module_name, attr = placeholder.split(":", 1)
    module = sys.modules.get(module_name)
    # Instances (a decorated merge function is a MergeMethod object) have no __qualname__ of their own.
    if module is not None and getattr(module, attr, None) is obj:
        return True
    return placeholder == f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', '')}"


def _derives(cls: type, base: str) -> bool:
    """Whether ``base`` (``"module:Class"``) is in ``cls``'s MRO."""
    return any(f"{c.__module__}:{c.__qualname__}" == base for c in cls.__mro__)


def _describe(entry: object) -> str:
    if isinstance(entry, str):
        return entry
    return f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', repr(entry))}"


_discovered = False


def discover_plugins(force: bool = False) -> None:
    """Import the built-in plugin index and every ``mergearena.plugins`` entry point once."""
    global _discovered
    if _discovered and not force:
        return
    _discovered = True
    importlib.import_module("bench.builtins")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as exc:  # a broken third-party plugin must not take the harness down
            raise RegistryError(f"plugin entry point {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        if callable(loaded) and not isinstance(loaded, type):
            loaded()


defenses: Registry = Registry("defense", subclass_of="bench.plugins:Defense")
attacks: Registry = Registry("attack", subclass_of="bench.plugins:Attack")
merges: Registry = Registry("merge method", instance_of="bench.merging:MergeMethod")
suites: Registry = Registry("suite", subclass_of="bench.suite:Suite")
families: Registry = Registry("family", subclass_of="bench.families.family:Family")
file_suites: Registry = Registry("data-file suite", subclass_of="bench.suite:Suite")
"""Suites built from a data file that a checkpoint-level command is given (``bench protect --data FILE``),
by file format; constructed as ``cls(file, family, base, tokenizer_dir)`` (`bench.checkpoint_data`)."""
