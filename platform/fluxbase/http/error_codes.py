"""The error codes each operation can answer, derived from the code that serves it.

The OpenAPI document lists, for every operation, only the codes of the catalog
(`fluxbase.errors`) it can answer. Nobody maintains those lists: `raised_by(handler)` reads the
source of the handler, of the dependencies it takes (the `caller` dependency authenticates and
rate-limits) and of every function of `fluxbase` they reach, and collects the `FluxbaseError`
classes constructed or raised on the way. A call is followed when its target can be named
statically: a module function, `module.function`, a class (its `__init__`), or a method of a
parameter, attribute or local whose type an annotation gives (methods of a class are followed
in its subclasses too, so a protocol's implementations count). What the edge itself answers
(`edge.on_http_exception`, `on_validation`, `on_unexpected`) is added by `transport_codes`.

It over-approximates (an error caught and replaced still counts), which is safe: the schemathesis
run in tests/test_openapi_contract.py fails when an operation answers a code its list lacks.
What static reading cannot see (a class chosen at run time) goes in `EXTRA`, keyed by
operation, with the reason.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

from fluxbase import errors
from fluxbase.errors import FluxbaseError

# Codes static reading cannot find, by operation id (keep each with its reason).
EXTRA: dict[str, frozenset[str]] = {}


def _is_error(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, FluxbaseError)


# The packages whose functions are read (tests add their own module).
ROOTS = {"fluxbase"}


def _ours(obj: Any) -> bool:
    return (getattr(obj, "__module__", "") or "").split(".")[0] in ROOTS


def _unwrap(fn: Any) -> Any:
    if isinstance(fn, (staticmethod, classmethod)):
        fn = fn.__func__
    if isinstance(fn, property):
        fn = fn.fget
    return inspect.unwrap(fn) if callable(fn) else fn


def _subclasses(cls: type) -> Iterator[type]:
    yield cls
    sub: type
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)


def _classes(hint: Any) -> list[type]:
    """The fluxbase classes an annotation names (through Optional, Annotated, Awaitable, ...)."""
    if isinstance(hint, type):
        return [hint] if _ours(hint) else []
    out: list[type] = []
    for arg in typing.get_args(hint):
        out += _classes(arg)
    return out


@cache
def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj, include_extras=False)
    except Exception:  # an annotation that does not evaluate at run time: no types from it
        return {}


def _members(cls: type, name: str) -> list[Any]:
    """`name` on `cls` and its fluxbase subclasses: methods to follow, or the attribute's types."""
    out: list[Any] = []
    for sub in _subclasses(cls):
        attr = inspect.getattr_static(sub, name, None)
        if attr is not None and not isinstance(attr, type):
            attr = _unwrap(attr)
            if inspect.isfunction(attr):
                out.append((attr, sub))
                continue
        out += [(None, c) for c in _classes(_hints(sub).get(name))]
    return out


class _Reader:
    """The call graph, read once per function: what each raises itself and what it reaches."""

    def __init__(self) -> None:
        self.graph: dict[tuple[Any, Any], tuple[set[type[FluxbaseError]], list[tuple[Any, Any]]]] = {}

    def _node(self, key: tuple[Any, Any]) -> tuple[set[type[FluxbaseError]], list[tuple[Any, Any]]]:
        if key not in self.graph:
            found: set[type[FluxbaseError]] = set()
            self.graph[key] = (found, self._edges(key[0], key[1], found))
        return self.graph[key]

    def codes(self, fn: Any, owner: type | None = None) -> set[type[FluxbaseError]]:
        """Everything reachable from `fn` (cycles included: a plain walk over the graph)."""
        out: set[type[FluxbaseError]] = set()
        seen: set[tuple[Any, Any]] = set()
        todo = [(fn, owner)]
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            found, edges = self._node(key)
            out |= found
            todo += edges
        return out

    def _edges(self, fn: Any, owner: type | None, found: set[type[FluxbaseError]]) -> list[tuple[Any, Any]]:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError):
            return []
        glb: dict[str, Any] = dict(getattr(fn, "__globals__", {}))
        for node in ast.walk(tree):  # imports inside the function: `from fluxbase.x import y`
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                module = sys.modules.get(node.module)
                for alias in node.names:
                    if module is not None and hasattr(module, alias.name):
                        glb[alias.asname or alias.name] = getattr(module, alias.name)
        local: dict[str, list[type]] = {}
        for name, hint in _hints(fn).items():
            local[name] = _classes(hint)
        if owner is not None:
            local["self"] = [owner]
            local["cls"] = [owner]
        # Locals assigned from a call whose return type is known: `req = await tenant_request(...)`.
        for node in ast.walk(tree):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                hinted = [c for _, c in self._resolve(node.annotation, glb, local) if c is not None]
                local.setdefault(node.target.id, []).extend(hinted)
            elif isinstance(node, ast.Assign) and len(node.targets) == 1:
                value = node.value.value if isinstance(node.value, ast.Await) else node.value
                names = [t for t in ast.walk(node.targets[0]) if isinstance(t, ast.Name)]
                if isinstance(value, ast.Call) and names:
                    ret = [c for _, c in self._resolve(value, glb, local) if c is not None]
                    # `x = SomeClass(...)`: a constructor (its __init__ is the other edge)
                    ret += [
                        c for t, c in self._resolve(value.func, glb, local) if t is None and c is not None
                    ]
                    for target_name in names:  # `a, b = f()`: each name may be any of the classes
                        local.setdefault(target_name.id, []).extend(ret)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    var = item.optional_vars
                    if isinstance(var, ast.Name) and isinstance(item.context_expr, ast.Call):
                        for target, _ in self._resolve(item.context_expr.func, glb, local):
                            if target is not None:
                                local.setdefault(var.id, []).extend(_yielded(_hints(target).get("return")))
        # An error class counts where it is constructed or raised, not where it is only named
        # (`except NotFound:`, `isinstance(exc, NotFound)`).
        made = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        made |= {id(n.exc) for n in ast.walk(tree) if isinstance(n, ast.Raise) and n.exc is not None}
        edges: list[tuple[Any, Any]] = []
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Name, ast.Attribute)) or not isinstance(node.ctx, ast.Load):
                continue
            for target, cls in self._resolve(node, glb, local):
                if target is not None:
                    edges.append((target, cls))
                elif cls is not None and _is_error(cls) and id(node) in made:
                    found.add(cls)
        return edges

    def _resolve(
        self, node: ast.expr, glb: dict[str, Any], local: dict[str, list[type]]
    ) -> list[tuple[Any, Any]]:
        """(function to follow, its class) or (None, class) for what an expression names."""
        if isinstance(node, ast.Name):
            if node.id in local and node.id not in ("self", "cls"):
                return [(None, c) for c in local[node.id]]
            if node.id in ("self", "cls"):
                return [(None, c) for c in local.get(node.id, [])]
            return _value(glb.get(node.id))
        if isinstance(node, ast.Attribute):
            out: list[tuple[Any, Any]] = []
            base = node.value
            if isinstance(base, ast.Name) and base.id not in local:
                obj = glb.get(base.id)
                if isinstance(obj, types.ModuleType):
                    return _value(getattr(obj, node.attr, None))
            for target, cls in self._resolve(base, glb, local):
                if target is None and cls is not None:
                    if _is_error(cls):
                        continue
                    out += _members(cls, node.attr)
            return out
        if isinstance(node, ast.Await):
            return self._resolve(node.value, glb, local)
        if isinstance(node, ast.Call):  # `_svc(ctx).open_public(...)`: what the call returns
            return [
                (None, c)
                for target, _ in self._resolve(node.func, glb, local)
                if target is not None
                for c in _classes(_hints(target).get("return"))
            ]
        return []


def _value(obj: Any) -> list[tuple[Any, Any]]:
    if obj is None:
        return []
    if _is_error(obj):
        return [(None, obj)]
    if isinstance(obj, type):
        if not _ours(obj):
            return []
        out: list[tuple[Any, Any]] = [(None, obj)]
        for name in ("__init__", "__post_init__"):
            fn = obj.__dict__.get(name)
            if inspect.isfunction(fn):
                out.append((fn, obj))
        return out
    fn = _unwrap(obj)
    if inspect.isfunction(fn) and _ours(fn):
        return [(fn, None)]
    return []


def _yielded(hint: Any) -> list[type]:
    """What `async with f() as x` binds when f is annotated AsyncIterator[X] / ContextManager[X]."""
    return _classes(hint)


_READER = _Reader()


def raised_by(*fns: Callable[..., Any]) -> set[type[FluxbaseError]]:
    """The catalog classes the functions (and what they reach) construct or raise."""
    out: set[type[FluxbaseError]] = set()
    for fn in fns:
        out |= _READER.codes(_unwrap(fn))
    return out


def transport_errors(has_params: bool, has_path_params: bool, has_body: bool) -> set[type[FluxbaseError]]:
    """What the edge answers for any operation: a crash, a database outage, bad input."""
    out: set[type[FluxbaseError]] = {errors.InternalError, errors.DatabaseUnavailable}
    if has_params or has_body:
        out.add(errors.ValidationError)  # Litestar's validation (edge.on_validation)
    if has_path_params:
        out.add(errors.NotFound)  # a path parameter the router cannot match (edge.on_http_exception)
    if has_body:
        out.add(errors.PayloadTooLarge)  # the request body limit (edge.on_http_exception)
    return out


def by_operation(app: Any) -> dict[str, set[type[FluxbaseError]]]:
    """Each operation id of the app: what its handler and its dependencies can raise."""
    out: dict[str, set[type[FluxbaseError]]] = {}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            op_id = getattr(handler, "operation_id", None)
            if not isinstance(op_id, str):
                continue
            fn = handler.fn
            deps = handler.resolve_dependencies()
            used = [deps[name].dependency for name in inspect.signature(fn).parameters if name in deps]
            out[op_id] = raised_by(fn, *used) | errors_named(EXTRA.get(op_id, frozenset()))
    return out


def errors_named(codes: frozenset[str]) -> set[type[FluxbaseError]]:
    """The catalog classes answering these codes."""
    found: set[type[FluxbaseError]] = set()
    for cls in _subclasses(FluxbaseError):
        if issubclass(cls, FluxbaseError) and cls.code in codes:
            found.add(cls)
    return found
