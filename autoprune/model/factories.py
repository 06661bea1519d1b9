"""Which `package.module:callable` factories a spec may name where specs come from someone else (the service).

A spec names code in four places: ``model.factory``, ``data.factory``, ``task.factory`` and
``evaluation.metric`` (anything but ``accuracy``/``top1`` is imported as ``pkg.mod:fn``); their
``kwargs`` are passed to the call. Where the spec is not the operator's own (``autoprune serve``), every
one of them must come from:

- autoprune's own factory modules (`AUTOPRUNE_FACTORY_MODULES`: the model zoo, the Hugging Face zoo, the
  data sets and the tasks), always; the rest of autoprune (the CLI, the service, the search machinery)
  is never a factory;
- packages the operator names at start (``autoprune serve --allow mypkg``, or
  ``AUTOPRUNE_ALLOWED_FACTORIES=mypkg,other.pkg``), a name covering its submodules.

Standard-library and interpreter modules (`sys.stdlib_module_names`, ``builtins``, ``__main__``) are
refused even when named. The attribute must be one public name (no ``_private``, no ``mod:os.system``
through an imported module), and the kwargs plain JSON values. Everything here is checked on the
strings, before anything is imported; `checked_import_object` repeats the check where the import happens
(the service's worker) and also requires the resolved object to be defined in an allowed module, so that
a name an allowed module merely imported (``from os import system``) is refused.
"""

from __future__ import annotations

import importlib
import re
import sys
from typing import Any, Callable, Iterable

from autoprune.errors import AutopruneError

ALLOW_ENV = "AUTOPRUNE_ALLOWED_FACTORIES"
AUTOPRUNE_FACTORY_MODULES = ("autoprune.model.zoo", "autoprune.model.hfzoo", "autoprune.model.data", "autoprune.model.task")
BUILTIN_METRICS = ("accuracy", "top1")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PUBLIC = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_INTERPRETER = frozenset({"builtins", "__main__", "__future__", "__builtin__", "site", "sitecustomize",
                          "usercustomize"})


class FactoryRefused(AutopruneError):
    """A factory outside the allow-list (HTTP 403) or kwargs that are not plain JSON (``status`` 422)."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


def is_stdlib(module: str) -> bool:
    """True for a standard-library or interpreter module (or a submodule of one), by its top-level name."""
    top = module.split(".", 1)[0]
    return (top in sys.stdlib_module_names or top in sys.builtin_module_names or top in _INTERPRETER
            or top.startswith("_"))


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def normalize_allowed(names: Iterable[str]) -> tuple[str, ...]:
    """The operator's extra packages, checked: dotted module names, no standard-library module, no part of
    autoprune beyond its factory modules (which are always allowed). Raises AutopruneError (exit 2)."""
    out: list[str] = []
    for raw in names:
        for name in str(raw).split(","):
            name = name.strip().rstrip(".")
            if not name:
                continue
            if not _MODULE.match(name):
                raise AutopruneError(f"--allow {name!r}: not a package or module name (e.g. mypkg or mypkg.models)")
            if is_stdlib(name):
                raise AutopruneError(f"--allow {name!r}: standard-library and interpreter modules cannot be allowed "
                                     "(a factory from them would run arbitrary code on this host)")
            if _within(name, "autoprune"):
                if name == "autoprune" or any(_within(name, m) for m in AUTOPRUNE_FACTORY_MODULES):
                    continue  # autoprune's factory modules are always allowed
                raise AutopruneError(f"--allow {name!r}: only autoprune's factory modules "
                                     f"({', '.join(AUTOPRUNE_FACTORY_MODULES)}) can be factories, and they are "
                                     "allowed by default")
            if name not in out:
                out.append(name)
    return tuple(out)


def allowed_from_env(environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The packages named in AUTOPRUNE_ALLOWED_FACTORIES (comma-separated; `settings.allowed_factories`),
    checked like --allow."""
    from autoprune import settings

    named = settings.get().allowed_factories if environ is None else environ.get(ALLOW_ENV, "")
    return normalize_allowed([named])


def allowed_modules(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """Every allowed module prefix: autoprune's factory modules plus the operator's packages."""
    return AUTOPRUNE_FACTORY_MODULES + tuple(p for p in extra if p not in AUTOPRUNE_FACTORY_MODULES)


def check_factory(path: Any, extra: Iterable[str] = (), key: str = "factory") -> None:
    """Raise FactoryRefused unless `path` is 'pkg.mod:name' with pkg.mod allowed and name one public name."""
    allowed = allowed_modules(extra)
    path = moved(path)
    where = f"{key} {path!r}"
    if not isinstance(path, str) or path.count(":") != 1:
        raise FactoryRefused(f"{where} is not of the form 'package.module:callable'", 422)
    module, attr = path.split(":")
    if not _MODULE.match(module):
        raise FactoryRefused(f"{where}: {module!r} is not a module name", 422)
    if is_stdlib(module):
        raise FactoryRefused(f"{where} is not allowed: standard-library and interpreter modules are never "
                             "factories here")
    if not any(_within(module, p) for p in allowed):
        raise FactoryRefused(f"{where} is not allowed here; this service accepts factories from "
                             f"{', '.join(allowed)} (the operator adds packages with `autoprune serve --allow PKG`)")
    if not _PUBLIC.match(attr):
        raise FactoryRefused(f"{where} is not allowed: the callable must be one public name of the module "
                             "(no '_private' names, no attributes of attributes)")


def check_json(value: Any, key: str, _depth: int = 0) -> None:
    """Raise FactoryRefused (422) unless `value` is plain JSON: str, int, float, bool, None, lists and
    string-keyed dicts of those."""
    if _depth > 32:
        raise FactoryRefused(f"{key}: nested too deeply", 422)
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            check_json(v, f"{key}[{i}]", _depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise FactoryRefused(f"{key}: key {k!r} is not a string (factory kwargs must be plain JSON)", 422)
            check_json(v, f"{key}.{k}", _depth + 1)
        return
    raise FactoryRefused(f"{key}: a {type(value).__name__} is not a plain JSON value (factory kwargs may hold "
                         "strings, numbers, booleans, null, lists and mappings only)", 422)


def spec_factories(data: dict) -> list[tuple[str, Any, Any]]:
    """(key, factory, kwargs) for every place a spec dict (raw or dumped) names code; kwargs None where
    the entry takes none. Missing sections fall back to the spec's defaults (data: autoprune.model.data:mnist1d)."""
    out: list[tuple[str, Any, Any]] = []
    for section, default in (("model", None), ("data", "autoprune.model.data:mnist1d"), ("task", None)):
        sec = data.get(section)
        sec = sec if isinstance(sec, dict) else {}
        factory = sec.get("factory", default)
        if factory is not None:
            out.append((f"{section}.factory", factory, sec.get("kwargs")))
        elif sec.get("kwargs") is not None:
            out.append((f"{section}.kwargs", None, sec.get("kwargs")))
    ev = data.get("evaluation")
    metric = ev.get("metric") if isinstance(ev, dict) else None
    if metric is not None and metric not in BUILTIN_METRICS:
        out.append(("evaluation.metric", metric, None))
    return out


def check_spec_factories(data: dict, extra: Iterable[str] = ()) -> None:
    """Every factory of a spec dict allowed and every kwargs plain JSON, else FactoryRefused; imports nothing."""
    extra = tuple(extra)
    for key, factory, kwargs in spec_factories(data):
        if factory is not None:
            check_factory(factory, extra, key)
        if kwargs is not None:
            kkey = key.rsplit(".", 1)[0] + ".kwargs"
            if not isinstance(kwargs, dict):
                raise FactoryRefused(f"{kkey} must be a mapping of plain JSON values", 422)
            check_json(kwargs, kkey)


_RESTRICTED: list[Callable[..., Any]] = []  # set by `restrict`: the allow-list import in force


def restrict(extra: Iterable[str] = ()) -> None:
    """From now on, `import_object` enforces the allow-list (autoprune's factory modules plus `extra`) where the
    import happens, as well as on the spec beforehand: what the service's workers call first."""
    _RESTRICTED[:] = [checked_import_object(extra)]


# modules that moved in the layout change (0.2): their old factory strings still resolve, with a warning
MOVED = {"autoprune.zoo": "autoprune.model.zoo", "autoprune.data": "autoprune.model.data",
         "autoprune.hfzoo": "autoprune.model.hfzoo", "autoprune.task": "autoprune.model.task"}


def moved(path: Any) -> Any:
    """`path` with a moved module's old name replaced by its new one (a DeprecationWarning says so)."""
    if isinstance(path, str) and ":" in path and path.split(":", 1)[0] in MOVED:
        import warnings

        old = path.split(":", 1)[0]
        new = MOVED[old] + path[len(old):]
        warnings.warn(f"factory {path!r} moved: write {new!r}", DeprecationWarning, stacklevel=3)
        return new
    return path


def import_object(path: str, what: str = "factory") -> Callable[..., Any]:
    """Resolve 'package.module:attr' to the object, or raise an error that says which part failed (and, after
    `restrict`, refuse what the allow-list does not name)."""
    path = moved(path)
    if _RESTRICTED:
        return _RESTRICTED[0](path, what)
    if ":" not in path:
        raise AutopruneError(f"{what} {path!r} is not of the form 'package.module:callable'")
    mod_name, attr = path.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, but also errors raised while importing the user's module
        raise AutopruneError(f"{what} {path!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e})") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AutopruneError(f"{what} {path!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise AutopruneError(f"{what} {path!r} is not callable")
    return obj



def checked_import_object(extra: Iterable[str] = ()) -> Callable[..., Any]:
    """An `import_object` that enforces the allow-list at import time as well."""
    extra = tuple(extra)
    allowed = allowed_modules(extra)

    def import_object(path: str, what: str = "factory") -> Callable[..., Any]:
        check_factory(path, extra, what)
        mod_name, attr = path.split(":")
        try:
            mod = importlib.import_module(mod_name)
        except Exception as e:  # noqa: BLE001 - ImportError or an error raised by the module itself
            raise AutopruneError(f"{what} {path!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e})") from None
        if not hasattr(mod, attr):
            raise AutopruneError(f"{what} {path!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(mod, attr)
        defined_in = getattr(obj, "__module__", None)
        if not isinstance(defined_in, str) or is_stdlib(defined_in) or not any(_within(defined_in, p) for p in allowed):
            raise FactoryRefused(f"{what} {path!r} is not allowed: it is defined in {defined_in!r}, which is not "
                                 f"an allowed package ({', '.join(allowed)})")
        if not callable(obj):
            raise AutopruneError(f"{what} {path!r} is not callable")
        return obj

    return import_object
