"""The code inspector (tokengate.guard.inspector): exact metrics on small functions, the
documented score and its ordering, unwrapping, fallbacks that never raise, the cache."""

from __future__ import annotations

import functools
import io
import math
import operator
import os
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from dataclasses import FrozenInstanceError, replace

import pytest

from _support import SAFETY
from tokengate import task_token_guard
from tokengate.guard import inspector
from tokengate.guard.inspector import (
    FALLBACK_SCORE,
    Inspection,
    complexity_score,
    inspect_function,
    score_of,
)

# --- functions under inspection (never called) -------------------------------------------------


def trivial(x):
    return x


def looping(xs):
    total = 0
    for x in xs:
        total += x
    return total


def looping_copy(xs):
    total = 0
    for x in xs:
        total += x
    return total


def nested_loops(n):
    total = 0
    for i in range(n):
        for j in range(n):
            total += i * j
    return total


def factorial(n):
    if n <= 1:
        return 1
    return n * factorial(n - 1)


def io_heavy(path):
    with open(path) as fh:
        data = fh.read()
    shutil.copy(path, path + ".bak")
    os.remove(path)
    return data


def branchy(a, b, xs):
    if a and b:  # if +1, and +1
        x = 1
    elif a or b or xs:  # elif +1, or-chain of three +2
        x = 2
    else:
        x = 3
    y = x if a else 0  # +1
    try:
        z = [i for i in xs if i if i > 1]  # comprehension for +1, two ifs +2
    except ValueError:  # +1
        z = []
    except TypeError:  # +1
        z = None
    while b:  # +1
        b -= 1
    match a:
        case 1:  # +1
            pass
        case _:  # +1
            pass
    return x, y, z


def deep(rows):
    total = 0
    for row in rows:  # level 1
        while row:  # level 2
            for cell in row:  # level 3
                total += cell
            row = row[1:]
    else:
        for _ in rows:  # an else clause runs once: level 1
            pass
    return total


def loop_with_else(xs):
    for _ in xs:
        pass
    else:
        for _ in xs:
            pass


def comprehension_in_loop(rows):
    for row in rows:
        yield [c for c in row]


def two_clause_comprehension(rows):
    return {c: 1 for row in rows for c in row}


def helper_defined_in_loop(rows, use):
    for row in rows:

        def each(r):
            for x in r:
                use(x)

        each(row)


def call_counts(f, g, obj):
    f(g(1), g(2))
    obj.method().other()
    return [f(i) for i in range(3)]


def io_mixed(path, sock, conn, gen, fh, p):
    print("print is not I/O here")  # not I/O
    open(path)  # I/O
    io.open(path)  # noqa: UP020 - I/O, the io.open spelling is what is tested
    os.remove(path)  # I/O
    os.path.join("a", "b")  # not I/O
    shutil.copy(path, path)  # I/O
    subprocess.run(["true"], check=False)  # I/O
    urllib.request.urlopen("http://127.0.0.1/")  # I/O
    urllib.parse.quote("x")  # not I/O
    p.read_text()  # I/O
    p.write_bytes(b"")  # I/O
    sock.sendall(b"x")  # I/O: the receiver is named like a socket
    conn.send(b"x")  # not I/O: the receiver is not
    gen.send(None)  # not I/O
    fh.write("x")  # not I/O: writes on an open file are not counted


class Node:
    def walk(self, n):
        return self.walk(n - 1) if n else 0

    def read(self):
        return self._socket.recv(4)

    @staticmethod
    def static(xs):
        return [x for x in xs]

    @classmethod
    def klass(cls, n):
        return cls.klass(n - 1) if n else cls


class Child(Node):
    def walk(self, n):
        return super().walk(n)


def outer_with_recursive_helper(tree):
    def visit(node):
        for child in node:
            visit(child)

    visit(tree)


def calls_another(n):
    return factorial(n)


class Callable:
    def __call__(self, xs):
        for x in xs:
            for _y in x:
                pass


class WithInit:
    def __init__(self, xs):
        self.xs = [x for x in xs]


def passthrough(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


@passthrough
@passthrough
def decorated(n):
    for _i in range(n):
        for _j in range(n):
            pass


@task_token_guard
def guarded(xs):
    for _x in xs:
        pass


async def coroutine(source):
    async for item in source:
        await item.save()


PAIR = (lambda x: x + 1, lambda y: [i for i in range(y)])
TWINS = (lambda v: v, lambda v: [i for i in v])  # same parameters: told apart by position

SPLIT = dict(
    first=1,
    key=lambda row: [
        cell
        for part in row
        for cell in part
    ],
)  # fmt: skip


def make_closure(k):
    def closure(xs):
        return [x * k for x in xs]

    return closure


# --- the score ----------------------------------------------------------------------------------


def test_score_follows_the_documented_formula():
    for fn in (trivial, looping, nested_loops, factorial, io_heavy, branchy, io_mixed):
        ins = inspect_function(fn)
        expected = (
            ins.cyclomatic
            + 3 * (2**ins.loop_depth - 1)
            + 0.25 * ins.calls
            + 4 * ins.io_calls
            + 15 * ins.recursive
        )
        assert ins.complexity_score == expected, fn.__name__
        assert score_of(fn) == expected
        assert ins.complexity_score >= 1.0
    assert complexity_score(1, 0, 0, 0, False) == 1.0
    assert complexity_score(2, 1, 4, 1, True) == 2 + 3 + 1 + 4 + 15
    assert complexity_score(1, 100, 0, 0, False) == 1 + 3 * (2**16 - 1)  # the exponent is capped


def test_scores_order_trivial_looping_nested_recursive_io():
    scores = [score_of(f) for f in (trivial, looping, nested_loops, factorial)]
    assert scores == [1.0, 5.0, 12.5, 17.25]
    assert score_of(io_heavy) > score_of(nested_loops)


def test_the_same_function_gives_the_same_object_and_a_copy_the_same_score():
    first = inspect_function(looping)
    assert inspect_function(looping) is first
    assert score_of(looping) == first.complexity_score
    copy = inspect_function(looping_copy)
    assert copy is not first  # another code object ...
    assert copy == first  # ... measured the same


def test_closures_of_one_def_share_the_cached_result():
    assert inspect_function(make_closure(2)) is inspect_function(make_closure(3))


def test_clear_cache_recomputes_an_equal_result():
    before = inspect_function(nested_loops)
    inspector.clear_cache()
    after = inspect_function(nested_loops)
    assert after is not before
    assert after == before


def test_inspection_is_frozen():
    ins = inspect_function(trivial)
    with pytest.raises(FrozenInstanceError):
        ins.calls = 3  # type: ignore[misc]
    assert replace(ins, calls=3).calls == 3


# --- each metric, exactly -----------------------------------------------------------------------


def test_metrics_of_the_small_functions():
    assert inspect_function(trivial) == Inspection(
        cyclomatic=1,
        loop_depth=0,
        calls=0,
        io_calls=0,
        recursive=False,
        lines=2,
        source=True,
        complexity_score=1.0,
        reason=None,
    )
    ins = inspect_function(nested_loops)
    assert (ins.cyclomatic, ins.loop_depth, ins.calls, ins.io_calls, ins.recursive) == (
        3,
        2,
        2,
        0,
        False,
    )
    assert ins.lines == 6


def test_cyclomatic_counts_every_documented_decision():
    ins = inspect_function(branchy)
    assert ins.cyclomatic == 15
    assert ins.loop_depth == 1
    assert ins.calls == 0


@pytest.mark.parametrize(
    ("fn", "depth"),
    [
        (trivial, 0),
        (looping, 1),
        (deep, 3),
        (loop_with_else, 1),
        (comprehension_in_loop, 2),
        (two_clause_comprehension, 2),
        (helper_defined_in_loop, 2),
    ],
)
def test_loop_depth(fn, depth):
    assert inspect_function(fn).loop_depth == depth


def test_calls_counts_every_call_expression():
    assert inspect_function(call_counts).calls == 7


def test_io_calls_follow_the_documented_list():
    ins = inspect_function(io_mixed)
    assert ins.calls == 15
    assert ins.io_calls == 9
    assert inspect_function(io_heavy).io_calls == 3
    assert inspect_function(Node.read).io_calls == 1  # self._socket.recv


@pytest.mark.parametrize(
    ("fn", "recursive"),
    [
        (factorial, True),
        (Node.walk, True),  # self.walk(...)
        (Node.klass, True),  # cls.klass(...)
        (Child.walk, False),  # super().walk(...) is the parent's
        (outer_with_recursive_helper, True),  # the nested helper calls itself
        (calls_another, False),
        (looping, False),
    ],
)
def test_recursion(fn, recursive):
    assert inspect_function(fn).recursive is recursive


def test_lines_include_decorators():
    assert inspect_function(looping).lines == 5
    # the innermost function, with its two decorator lines
    assert inspect_function(decorated).lines == 6


# --- what gets inspected --------------------------------------------------------------------------


def test_functools_wraps_chain_is_looked_through():
    ins = inspect_function(decorated)
    assert ins.source
    assert ins.loop_depth == 2  # the wrapper has no loop: the wrapped function was inspected
    assert ins is inspect_function(decorated.__wrapped__.__wrapped__)


def test_partial_is_looked_through():
    assert inspect_function(functools.partial(looping, [1])) is inspect_function(looping)
    nested = functools.partial(functools.partial(nested_loops), 3)
    assert inspect_function(nested) is inspect_function(nested_loops)


def test_guarded_function_is_looked_through():
    assert inspect_function(guarded) is inspect_function(guarded.func)
    assert inspect_function(guarded).loop_depth == 1


def test_methods():
    node = Node()
    assert inspect_function(node.walk) is inspect_function(Node.walk)
    assert inspect_function(Node.static).loop_depth == 1
    assert inspect_function(Node.__dict__["static"]).loop_depth == 1  # the staticmethod object
    assert inspect_function(Node.klass).recursive  # bound to the class


def test_callable_object_and_class():
    ins = inspect_function(Callable())
    assert ins.source and ins.loop_depth == 2
    assert inspect_function(Callable()) is inspect_function(Callable.__call__)
    assert inspect_function(WithInit).loop_depth == 1  # its __init__


def test_async_def_is_inspected():
    ins = inspect_function(coroutine)
    assert ins.source
    assert (ins.loop_depth, ins.calls, ins.cyclomatic) == (1, 1, 2)


def test_lambdas_with_source():
    plain, comp = (inspect_function(f) for f in PAIR)
    assert plain.source and comp.source
    assert (plain.loop_depth, plain.calls) == (0, 0)  # not confused with its neighbour
    assert (comp.loop_depth, comp.calls) == (1, 1)
    same, other = (inspect_function(f) for f in TWINS)
    assert same.source and other.source
    assert (same.loop_depth, other.loop_depth) == (0, 1)
    split = inspect_function(SPLIT["key"])
    assert split.source
    assert split.loop_depth == 2
    assert split.lines == 5


# --- fallbacks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [len, math.sqrt, str.upper, "x".upper, dict, functools.partial(len, "abc"), print],
    ids=["len", "math.sqrt", "str.upper", "bound builtin", "dict", "partial(len)", "print"],
)
def test_builtins_fall_back(fn):
    ins = inspect_function(fn)
    assert ins.source is False
    assert ins.reason == "builtin"
    assert ins.complexity_score == FALLBACK_SCORE == 1.0
    assert (ins.cyclomatic, ins.calls, ins.lines) == (0, 0, 0)


def test_c_callable_object_falls_back_and_is_cached_by_identity():
    getter = operator.itemgetter(1)
    ins = inspect_function(getter)
    assert not ins.source
    assert ins.reason is not None and ins.reason.startswith("no source available")
    assert "itemgetter" in ins.reason
    assert inspect_function(getter) is ins


def test_fallback_cache_is_bounded():
    getters = [operator.itemgetter(i) for i in range(inspector._FALLBACK_CACHE_SIZE + 50)]
    for g in getters:
        inspect_function(g)
    assert len(inspector._by_object) == inspector._FALLBACK_CACHE_SIZE
    # the most recent ones are kept
    assert inspect_function(getters[-1]) is inspect_function(getters[-1])


def test_exec_made_lambda_falls_back_to_the_bytecode():
    ns: dict[str, object] = {}
    exec("f = lambda x: x + 1", ns)
    ins = inspect_function(ns["f"])
    assert not ins.source
    assert ins.reason is not None and ins.reason.startswith("no source available: ")
    assert ins.complexity_score == 1.0
    assert ins.lines == 1


def test_exec_made_function_is_scored_from_its_bytecode():
    ns: dict[str, object] = {}
    code = compile(
        "def g(n):\n"
        "    for i in range(n):\n"
        "        for j in range(n):\n"
        "            pass\n"
        "    return g(n - 1)\n",
        "<stdin>",
        "exec",
    )
    exec(code, ns)
    ins = inspect_function(ns["g"])
    assert not ins.source
    assert (ins.loop_depth, ins.calls, ins.recursive, ins.io_calls) == (2, 3, True, 0)
    assert ins.cyclomatic == 3  # two FOR_ITER
    assert ins.complexity_score == complexity_score(3, 2, 3, 0, True)


def test_source_that_does_not_match_the_code_falls_back():
    # a code object claiming to come from this file, at a line where no such def is
    ns: dict[str, object] = {}
    exec(compile("def not_in_this_file():\n    return 1\n", __file__, "exec"), ns)
    ins = inspect_function(ns["not_in_this_file"])
    assert not ins.source
    assert ins.reason is not None and "not_in_this_file" in ins.reason


def test_odd_objects_never_raise():
    class Hostile:
        def __getattr__(self, name):
            raise RuntimeError(f"no {name}")

        def __call__(self):
            for _ in range(3):
                pass

    class Evil:
        @property
        def __class__(self):
            raise RuntimeError("no class")

    assert inspect_function(Hostile()).loop_depth == 1  # its __call__, despite __getattr__
    evil = inspect_function(Evil())
    assert not evil.source and evil.reason is not None
    assert evil.complexity_score == FALLBACK_SCORE
    not_callable = inspect_function(42)
    assert not not_callable.source
    assert not_callable.reason is not None and "not callable" in not_callable.reason

    def a():
        return 1

    def b():
        return 2

    a.__wrapped__ = b  # type: ignore[attr-defined]
    b.__wrapped__ = a  # type: ignore[attr-defined]
    assert inspect_function(a).source  # a cycle ends the unwrapping


# --- threads ------------------------------------------------------------------------------------


def test_threads_inspecting_the_same_function_get_the_same_result():
    inspector.clear_cache()
    barrier = threading.Barrier(8)
    results: list[Inspection | None] = [None] * 8

    def work(i: int) -> None:
        barrier.wait(timeout=SAFETY)
        results[i] = inspect_function(nested_loops)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SAFETY)
    assert not any(t.is_alive() for t in threads)
    first = results[0]
    assert first is not None and first.complexity_score == 12.5
    assert all(r is first for r in results)
    assert inspect_function(nested_loops) is first
