"""The code inspector: a static, cached complexity estimate of a guarded function.

:func:`inspect_function` reads a function's own source (``inspect.getsource`` of its code
object, ``textwrap.dedent``, ``ast.parse``), finds the node of that one function (never the
whole module) and measures it; :func:`score_of` returns just the score, which the core asks for
once per operation. Results are cached per code object, so the same function (and every closure
made from the same ``def``) is analysed once, and the calls are thread-safe.

The score
---------

::

    complexity_score = cyclomatic
                     + 3 * (2 ** loop_depth - 1)
                     + 0.25 * calls
                     + 4 * io_calls
                     + 15 * recursive

==============  ==============  ==============================================================
metric          adds            why
==============  ==============  ==============================================================
cyclomatic      1 per path      the unit: a straight-line function scores 1, so every score
                                from source is >= 1
loop_depth d    3 * (2^d - 1)   nested loops multiply work (a d-deep nest is O(n^d)): one
                                loop adds 3, two nested 9, three 21 (d is capped at 16)
calls           0.25 each       a call is cheap on its own: four calls weigh one branch
io_calls        4 each          a syscall or a network round trip costs far more than
                                bytecode: each weighs more than a whole loop level
recursive       15 if True      a loop whose depth only the data knows (and that may branch):
                                more than a doubly nested loop (9), less than a triple (21)
==============  ==============  ==============================================================

Every weight is a multiple of 1/4, so the float is exact and identical on every run. With
these weights a trivial function (1) < one loop (about 5) < two nested loops (about 12) <
a recursive function (about 17) or one doing a few I/O calls.

What is measured (on the function's source)
-------------------------------------------

``cyclomatic``
    1 + one per ``if``/``elif``, conditional expression, ``for``/``async for``, ``while``,
    ``except`` clause, ``case`` of a ``match``, comprehension ``for`` clause and comprehension
    ``if`` clause, + ``len(values) - 1`` per ``and``/``or`` chain.
``loop_depth``
    The deepest nesting of ``for``/``async for``/``while``; each ``for`` clause of a
    comprehension (or generator expression) is one more level.
``calls``
    The number of call expressions (``ast.Call`` nodes).
``io_calls``
    Calls that do I/O, matched by the callee *as written* (imports are not resolved, so
    ``from os import remove; remove(p)`` is not seen); a call counts at most once:

    * the names in :data:`IO_FUNCTIONS` (``open``, ``io.open``, ``os.write``, ``os.read``, ...);
    * anything under the modules in :data:`IO_MODULES` (``shutil.*``, ``socket.*``,
      ``subprocess.*``, ``requests.*``, ``urllib.request.*``, ``http.client.*``);
    * the path methods in :data:`PATH_METHODS` on any receiver (``p.read_text()``,
      ``Path(x).open()``, ``p.unlink()``, ...);
    * the socket methods in :data:`SOCKET_METHODS` (``connect``, ``send``, ``sendall``,
      ``recv``, ...) when the receiver's own name contains ``sock`` (``sock.send()``,
      ``self._socket.recv()``, ``client_sock.sendall()``) — a naming heuristic, nothing more.

    ``print`` is not I/O here, nor are reads and writes on an already open file object.
``recursive``
    The body calls the function's own name (``f(...)``, or ``self.f(...)``/``cls.f(...)``
    for a method), or a nested function calls its own name.
``lines``
    The lines of the function's source, decorators included.

Nested ``def``, ``lambda`` and ``class`` bodies count toward the enclosing function, at the
loop depth where they are defined: a helper is defined to be called, so its cost is the outer
function's cost (a helper defined inside a loop is one loop level deeper). The function's own
decorators and argument defaults do not count: they run once, when it is defined.

What is inspected
-----------------

Wrappers are looked through, repeatedly: TokenGate's ``GuardedFunction`` (``.func``),
``functools.partial``/``partialmethod`` (``.func``), bound methods, ``staticmethod`` and
``classmethod`` (``__func__``), ``functools.wraps`` chains (``__wrapped__``), an object whose
class defines ``__call__`` in Python (that ``__call__``) and a class (its Python ``__init__``,
else its Python ``__new__``). ``async def`` functions and generators are inspected like any
function.

A lambda's line may hold other code: the inspector picks the ``lambda`` node on the code's
first line whose body contains every source position recorded in the code object (then, if
still ambiguous, the one whose parameters match).

Fallbacks (never an exception)
------------------------------

* Builtins and C functions (``len``, ``math.sqrt``, ``str.upper``, a ``partial`` of one) and
  other callables without Python code: ``source=False``, ``reason`` says why (``"builtin"``,
  ``"no source available: ..."``), every metric 0 and the score :data:`FALLBACK_SCORE` (1.0).
* Python functions whose source cannot be had or does not match (``exec``-made functions,
  lambdas typed in a REPL, an edited file): ``source=False``, ``reason`` starts with
  ``"no source available: "``, and the metrics are read, roughly, from the bytecode (see
  :func:`_from_bytecode`): ``cyclomatic`` = 1 + forward conditional jumps, ``FOR_ITER`` and
  exception matches; ``loop_depth`` = the deepest nesting of backward jumps; ``calls`` = the
  call instructions; ``recursive`` = the code loads its own name as a global; ``io_calls`` = 0;
  ``lines`` = the distinct line numbers. The same formula gives a score >= 1.
"""

from __future__ import annotations

import ast
import dis
import functools
import inspect
import logging
import textwrap
import threading
import types
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "FALLBACK_SCORE",
    "IO_FUNCTIONS",
    "IO_MODULES",
    "PATH_METHODS",
    "SOCKET_METHODS",
    "Inspection",
    "clear_cache",
    "complexity_score",
    "inspect_function",
    "score_of",
]

log = logging.getLogger("tokengate.guard.inspector")

#: The score of a callable without Python code (builtins, C functions).
FALLBACK_SCORE: Final[float] = 1.0

#: Callees (as written) that do I/O.
IO_FUNCTIONS: Final[frozenset[str]] = frozenset(
    {
        "open",
        "io.open",
        "os.open",
        "os.read",
        "os.write",
        "os.fsync",
        "os.remove",
        "os.unlink",
        "os.rename",
        "os.replace",
        "os.makedirs",
        "os.mkdir",
        "os.rmdir",
        "os.listdir",
        "os.scandir",
    }
)

#: Modules every call into which (``module.anything(...)``) counts as I/O.
IO_MODULES: Final[tuple[str, ...]] = (
    "shutil",
    "socket",
    "subprocess",
    "requests",
    "urllib.request",
    "http.client",
)

#: Methods that do I/O whatever they are called on (``pathlib.Path``'s, mostly).
PATH_METHODS: Final[frozenset[str]] = frozenset(
    {
        "open",
        "read_text",
        "read_bytes",
        "write_text",
        "write_bytes",
        "unlink",
        "touch",
        "mkdir",
        "rmdir",
    }
)

#: Methods that do I/O when called on something whose name contains ``sock``.
SOCKET_METHODS: Final[frozenset[str]] = frozenset(
    {"accept", "connect", "recv", "recv_into", "recvfrom", "send", "sendall", "sendto"}
)

_IO_PREFIXES: Final[tuple[str, ...]] = tuple(m + "." for m in IO_MODULES)
_MAX_UNWRAP: Final[int] = 64
_MAX_LOOP_EXPONENT: Final[int] = 16
_FALLBACK_CACHE_SIZE: Final[int] = 1024
_BUILTIN_TYPES: Final[tuple[type, ...]] = (
    types.BuiltinFunctionType,
    types.BuiltinMethodType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
    types.ClassMethodDescriptorType,
)


@dataclass(frozen=True, slots=True)
class Inspection:
    """What the inspector measured on one function (see the module docstring for each
    metric and for the score)."""

    cyclomatic: int
    """McCabe complexity: 1 + decision points."""
    loop_depth: int
    """Deepest nesting of loops (comprehension clauses included)."""
    calls: int
    """Call expressions."""
    io_calls: int
    """Calls that do I/O."""
    recursive: bool
    """Whether the function calls its own name."""
    lines: int
    """Lines of source (from the bytecode's line table when there is no source)."""
    source: bool
    """Whether the metrics come from the function's source."""
    complexity_score: float
    """:func:`complexity_score` of the metrics above, or :data:`FALLBACK_SCORE`."""
    reason: str | None
    """Why the source was not used (None when it was)."""


def complexity_score(
    cyclomatic: int, loop_depth: int, calls: int, io_calls: int, recursive: bool
) -> float:
    """The documented score of these metrics (see the module docstring for the reasons):
    ``cyclomatic + 3 * (2 ** min(loop_depth, 16) - 1) + 0.25 * calls + 4 * io_calls
    + 15 * recursive``.

    ==============  ==============
    metric          adds
    ==============  ==============
    cyclomatic      1 per path
    loop_depth d    3 * (2^d - 1)
    calls           0.25 each
    io_calls        4 each
    recursive       15 if True
    ==============  ==============
    """
    depth = min(max(loop_depth, 0), _MAX_LOOP_EXPONENT)
    return float(
        cyclomatic + 3 * (2**depth - 1) + 0.25 * calls + 4 * io_calls + (15 if recursive else 0)
    )


# ---------------------------------------------------------------------------------------------
# cache

_lock = threading.Lock()
_by_code: weakref.WeakKeyDictionary[types.CodeType, Inspection] = weakref.WeakKeyDictionary()
# id(target) -> (target, result); holding the target keeps its id from being reused.
_by_object: OrderedDict[int, tuple[object, Inspection]] = OrderedDict()


def clear_cache() -> None:
    """Forget every cached inspection (they are recomputed on the next call)."""
    with _lock:
        _by_code.clear()
        _by_object.clear()


def inspect_function(fn: object) -> Inspection:
    """Inspect ``fn`` (looking through wrappers, see the module docstring) and return its
    :class:`Inspection`.

    Cached per code object: the same function, or another closure of the same ``def``, gives
    back the very same object. Callables without Python code are cached by identity in a
    bounded table. Thread-safe; never raises: whatever goes wrong yields a fallback
    inspection whose ``reason`` says what."""
    try:
        return _inspect(fn)
    except Exception as exc:  # an object whose attributes, or whose error's str(), raise
        try:
            what = f"{type(exc).__name__}: {exc}"
        except Exception:
            what = type(exc).__name__
        return _fallback(f"no source available: inspecting it raised {what}")


def _inspect(fn: object) -> Inspection:
    try:
        target = _resolve(fn)
    except Exception as exc:  # a hostile __getattr__, say
        return _fallback(f"no source available: cannot unwrap {type(fn).__name__}: {exc}")
    code = getattr(target, "__code__", None) if isinstance(target, types.FunctionType) else None
    if isinstance(code, types.CodeType):
        with _lock:
            hit = _by_code.get(code)
        if hit is not None:
            return hit
        result = _analyze_code(code)
        with _lock:
            return _by_code.setdefault(code, result)
    key = id(target)
    with _lock:
        entry = _by_object.get(key)
        if entry is not None and entry[0] is target:
            _by_object.move_to_end(key)
            return entry[1]
    result = _fallback(_why_no_code(target))
    with _lock:
        entry = _by_object.get(key)
        if entry is not None and entry[0] is target:
            return entry[1]
        _by_object[key] = (target, result)
        while len(_by_object) > _FALLBACK_CACHE_SIZE:
            _by_object.popitem(last=False)
    return result


def score_of(fn: object) -> float:
    """``inspect_function(fn).complexity_score`` (cached; never raises)."""
    return inspect_function(fn).complexity_score


# ---------------------------------------------------------------------------------------------
# unwrapping


def _guarded_function_type() -> type | None:
    try:
        from .._core import GuardedFunction
    except ImportError:  # pragma: no cover - the native core is always built with the package
        return None
    return GuardedFunction


def _python_function(obj: object) -> types.FunctionType | None:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return obj if isinstance(obj, types.FunctionType) else None


def _step(obj: object, guarded: type | None) -> object | None:
    """The callable ``obj`` runs in its place, or None when ``obj`` is the end of the chain."""
    if guarded is not None and isinstance(obj, guarded):
        func: object = obj.func  # type: ignore[attr-defined]
        return func
    if isinstance(obj, (functools.partial, functools.partialmethod)):
        return obj.func
    if isinstance(obj, (types.MethodType, staticmethod, classmethod)):
        return obj.__func__
    try:
        wrapped: object = getattr(obj, "__wrapped__", None)
    except Exception:  # a __getattr__ that raises something other than AttributeError
        wrapped = None
    if wrapped is not None and callable(wrapped):
        return wrapped
    if isinstance(obj, types.FunctionType) or isinstance(obj, _BUILTIN_TYPES):
        return None
    if isinstance(obj, type):
        for name in ("__init__", "__new__"):
            fn = _python_function(inspect.getattr_static(obj, name, None))
            if fn is not None:
                return fn
        return None
    return _python_function(inspect.getattr_static(type(obj), "__call__", None))


def _resolve(fn: object) -> object:
    guarded = _guarded_function_type()
    seen: set[int] = set()
    obj = fn
    for _ in range(_MAX_UNWRAP):
        seen.add(id(obj))
        nxt = _step(obj, guarded)
        if nxt is None or id(nxt) in seen:
            break
        obj = nxt
    return obj


def _why_no_code(target: object) -> str:
    if isinstance(target, _BUILTIN_TYPES):
        return "builtin"
    if isinstance(target, type):
        if target.__module__ == "builtins":
            return "builtin"
        return f"no source available: class {target.__qualname__} has no Python __init__/__new__"
    if not callable(target):
        return f"no source available: {type(target).__name__} object is not callable"
    return f"no source available: {type(target).__name__} object has no Python code"


def _fallback(reason: str) -> Inspection:
    log.debug("code inspector fallback: %s", reason)
    return Inspection(
        cyclomatic=0,
        loop_depth=0,
        calls=0,
        io_calls=0,
        recursive=False,
        lines=0,
        source=False,
        complexity_score=FALLBACK_SCORE,
        reason=reason,
    )


# ---------------------------------------------------------------------------------------------
# source analysis

_FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda


def _analyze_code(code: types.CodeType) -> Inspection:
    try:
        found = _find_node(code)
    except Exception as exc:  # OSError, SyntaxError, RecursionError, ...
        found = f"{type(exc).__name__}: {exc}"
    if isinstance(found, str):
        return _from_bytecode(code, f"no source available: {found}")
    try:
        walker = _Walker(found)
        walker.run()
    except Exception as exc:  # RecursionError on absurdly deep code
        return _from_bytecode(code, f"no source available: analysis failed: {exc!r}")
    first = min([found.lineno, *(d.lineno for d in _decorators(found))])
    end = found.end_lineno if found.end_lineno is not None else found.lineno
    return Inspection(
        cyclomatic=walker.cyclomatic,
        loop_depth=walker.max_depth,
        calls=walker.calls,
        io_calls=walker.io_calls,
        recursive=walker.recursive,
        lines=end - first + 1,
        source=True,
        complexity_score=complexity_score(
            walker.cyclomatic, walker.max_depth, walker.calls, walker.io_calls, walker.recursive
        ),
        reason=None,
    )


def _decorators(node: _FunctionNode) -> list[ast.expr]:
    return [] if isinstance(node, ast.Lambda) else node.decorator_list


def _find_node(code: types.CodeType) -> _FunctionNode | str:
    """The function's AST node (line numbers of the file), or why there is none. Tries the
    function's own source first, then the whole file (a lambda on a continuation line, a
    docstring that defeats ``dedent``)."""
    lines, start = inspect.getsourcelines(code)
    try:
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except SyntaxError:
        tree = None
    if tree is not None:
        ast.increment_lineno(tree, start - 1)
        node = _match(tree, code)
        if not isinstance(node, str):
            return node
    all_lines, _ = inspect.findsource(code)
    return _match(ast.parse("".join(all_lines)), code)


def _match(tree: ast.AST, code: types.CodeType) -> _FunctionNode | str:
    first = code.co_firstlineno
    if code.co_name != "<lambda>":
        for node in ast.walk(tree):
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.name == code.co_name
                and first in {node.lineno, *(d.lineno for d in node.decorator_list)}
            ):
                return node
        return f"no def {code.co_name!r} at line {first} of the source"
    lambdas = [n for n in ast.walk(tree) if isinstance(n, ast.Lambda) and n.lineno == first]
    if len(lambdas) > 1:
        lambdas = _narrow_lambdas(lambdas, code)
    if len(lambdas) == 1:
        return lambdas[0]
    if not lambdas:
        return f"no lambda at line {first} of the source"
    return f"{len(lambdas)} lambdas at line {first} cannot be told apart"


def _narrow_lambdas(lambdas: list[ast.Lambda], code: types.CodeType) -> list[ast.Lambda]:
    spans = [
        (p[0], p[2], p[1], p[3])
        for p in code.co_positions()
        if None not in p and (p[0], p[2]) != (p[1], p[3])
    ]
    if spans:

        def contains(node: ast.Lambda) -> bool:
            body = node.body
            if body.end_lineno is None or body.end_col_offset is None:
                return False
            lo = (body.lineno, body.col_offset)
            hi = (body.end_lineno, body.end_col_offset)
            return all(lo <= (s[0], s[1]) and (s[2], s[3]) <= hi for s in spans)

        inside = [n for n in lambdas if contains(n)]
        if inside:
            # the innermost one (a lambda inside another's body is inside both)
            inside.sort(key=lambda n: (n.lineno, n.col_offset), reverse=True)
            return inside[:1]
    nargs = code.co_argcount + code.co_kwonlyargcount
    names = list(code.co_varnames[:nargs])
    by_args = [
        n
        for n in lambdas
        if [a.arg for a in (*n.args.posonlyargs, *n.args.args, *n.args.kwonlyargs)] == names
    ]
    return by_args or lambdas


def _dotted(expr: ast.expr) -> str | None:
    parts: list[str] = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return None
    parts.append(expr.id)
    return ".".join(reversed(parts))


def _terminal_name(expr: ast.expr) -> str | None:
    while True:
        if isinstance(expr, ast.Name):
            return expr.id
        if isinstance(expr, ast.Attribute):
            return expr.attr
        if isinstance(expr, ast.Subscript):
            expr = expr.value
        elif isinstance(expr, ast.Call):
            expr = expr.func
        else:
            return None


def _is_io_call(func: ast.expr) -> bool:
    name = _dotted(func)
    if name is not None and (name in IO_FUNCTIONS or name.startswith(_IO_PREFIXES)):
        return True
    if isinstance(func, ast.Attribute):
        if func.attr in PATH_METHODS:
            return True
        if func.attr in SOCKET_METHODS:
            receiver = _terminal_name(func.value)
            return receiver is not None and "sock" in receiver.lower()
    return False


class _Walker:
    """Walks one function node, tracking the loop depth."""

    def __init__(self, root: _FunctionNode) -> None:
        self.root = root
        self.cyclomatic = 1
        self.max_depth = 0
        self.calls = 0
        self.io_calls = 0
        self.recursive = False
        self._names: list[str] = [] if isinstance(root, ast.Lambda) else [root.name]

    def run(self) -> None:
        root = self.root
        if isinstance(root, ast.Lambda):
            self.visit(root.body, 0)
        else:
            for stmt in root.body:
                self.visit(stmt, 0)

    def _loop_level(self, depth: int) -> None:
        self.max_depth = max(self.max_depth, depth)

    def visit_all(self, nodes: list[Any], depth: int) -> None:
        for node in nodes:
            self.visit(node, depth)

    def visit(self, node: ast.AST, depth: int) -> None:
        if isinstance(node, (ast.For, ast.AsyncFor)):
            self.cyclomatic += 1
            self.visit(node.target, depth)
            self.visit(node.iter, depth)
            self._loop_level(depth + 1)
            self.visit_all(node.body, depth + 1)
            self.visit_all(node.orelse, depth)
            return
        if isinstance(node, ast.While):
            self.cyclomatic += 1
            self._loop_level(depth + 1)
            self.visit(node.test, depth + 1)
            self.visit_all(node.body, depth + 1)
            self.visit_all(node.orelse, depth)
            return
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            for i, gen in enumerate(node.generators):
                self.cyclomatic += 1 + len(gen.ifs)
                self.visit(gen.iter, depth + i)
                self._loop_level(depth + i + 1)
                self.visit(gen.target, depth + i + 1)
                self.visit_all(gen.ifs, depth + i + 1)
            inner = depth + len(node.generators)
            if isinstance(node, ast.DictComp):
                self.visit(node.key, inner)
                self.visit(node.value, inner)
            else:
                self.visit(node.elt, inner)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self._names.append(node.name)
            try:
                self._generic(node, depth)
            finally:
                self._names.pop()
            return
        if isinstance(node, (ast.If, ast.IfExp, ast.ExceptHandler, ast.match_case)):
            self.cyclomatic += 1
        elif isinstance(node, ast.BoolOp):
            self.cyclomatic += len(node.values) - 1
        elif isinstance(node, ast.Call):
            self._call(node)
        self._generic(node, depth)

    def _generic(self, node: ast.AST, depth: int) -> None:
        for child in ast.iter_child_nodes(node):
            self.visit(child, depth)

    def _call(self, node: ast.Call) -> None:
        self.calls += 1
        func = node.func
        if _is_io_call(func):
            self.io_calls += 1
        if isinstance(func, ast.Name) and func.id in self._names:
            self.recursive = True
        elif (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id in {"self", "cls"}
            and func.attr in self._names
        ):
            self.recursive = True


# ---------------------------------------------------------------------------------------------
# bytecode fallback


def _bytecode_metrics(code: types.CodeType, seen: set[int]) -> tuple[int, int, int, bool]:
    """(decisions, loop depth, calls, recursive) of ``code`` and the code objects nested in
    it (comprehensions, nested functions); the depth is the deepest of any one of them."""
    seen.add(id(code))
    decisions = 0
    calls = 0
    recursive = False
    loops: list[tuple[int, int]] = []
    for ins in dis.get_instructions(code):
        op = ins.opname
        target = ins.argval if isinstance(ins.argval, int) else None
        is_jump = ins.opcode in dis.hasjrel or ins.opcode in dis.hasjabs
        if op == "FOR_ITER" or op in {"CHECK_EXC_MATCH", "CHECK_EG_MATCH"}:
            decisions += 1
        elif is_jump and "IF" in op and target is not None and target > ins.offset:
            decisions += 1
        if is_jump and target is not None and target < ins.offset and "NO_INTERRUPT" not in op:
            loops.append((target, ins.offset))
        if op.startswith("CALL") and not op.startswith("CALL_INTRINSIC"):
            calls += 1
        if op in {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF"} and ins.argval == code.co_name:
            recursive = True
    depth = max(
        (sum(1 for s, e in loops if s <= start <= e) for start, _ in loops),
        default=0,
    )
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and id(const) not in seen:
            d, ld, c, r = _bytecode_metrics(const, seen)
            decisions += d
            depth = max(depth, ld)
            calls += c
            recursive = recursive or r
    return decisions, depth, calls, recursive


def _from_bytecode(code: types.CodeType, reason: str) -> Inspection:
    """A rough inspection read from the bytecode, for Python code without usable source."""
    log.debug("code inspector: %s (%s); using the bytecode", code.co_qualname, reason)
    try:
        decisions, depth, calls, recursive = _bytecode_metrics(code, set())
        lines = len({ln for _, _, ln in code.co_lines() if ln is not None})
    except Exception as exc:  # pragma: no cover - dis handles any code object
        return _fallback(f"{reason}; bytecode unreadable: {exc!r}")
    cyclomatic = 1 + decisions
    return Inspection(
        cyclomatic=cyclomatic,
        loop_depth=depth,
        calls=calls,
        io_calls=0,
        recursive=recursive,
        lines=lines,
        source=False,
        complexity_score=complexity_score(cyclomatic, depth, calls, 0, recursive),
        reason=reason,
    )
