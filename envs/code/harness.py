"""How a code task's asserts are judged: the solution's values cross the sandbox, the verdict does not.

The invariant: nothing the agent's code does inside its interpreter can make a test pass except
returning the right plain values. So each test `assert EXPR` is split, outside the sandbox, into
*probes*, the smallest parts of EXPR that need the solution (a call of a function it defines, a name it
binds, a method of an object it built), and the rest, which stays here. The sandbox runs the solution
and the probes only, and sends back each probe's `repr`; this process decodes it with
`ast.literal_eval` (numbers, strings, bytes, None, and tuples, lists, dicts and sets of them) and
evaluates the rest of EXPR over those plain values with a few builtins. The expected values never
enter the sandbox, and an object with an always-true `__eq__`, a patched `json.dumps` or a forged
report changes nothing but what the solution claims its functions return.

A test must be one `assert EXPR[, MSG]` whose probes use no names bound inside the test (a
comprehension variable): `Check.of` says which rule a test breaks, naming it.

>>> check = Check.of("assert len(f(3)) == 3")
>>> check.probes
['f(3)']
>>> check.judge([("value", "[1, 2, 3]")]), check.judge([("value", "[1]")])
(None, 'AssertionError')
"""

from __future__ import annotations

import ast
import builtins
import functools
from typing import Any

__all__ = ["Check", "HARNESS", "SAFE_BUILTINS"]

SAFE_BUILTINS = {name: getattr(builtins, name) for name in (
    "abs", "all", "any", "bool", "dict", "divmod", "enumerate", "float", "frozenset", "int", "isinstance", "len",
    "list", "max", "min", "range", "repr", "reversed", "round", "set", "sorted", "str", "sum", "tuple", "zip",
)}
"""What a test evaluates outside the sandbox besides the probed values; any other name is the solution's."""

SHOWN_CHARS = 80
"""Characters of a value that is not plain quoted in a failure."""

HARNESS = '''\
import json, os, sys, traceback
report = os.fdopen(os.dup(1), "w")
sink = open("output.txt", "w")
os.dup2(sink.fileno(), 1)
os.dup2(sink.fileno(), 2)
probes = json.load(open("probes.json"))
source = open("solution.py").read()
for name in ("probes.json", "main.py"):
    os.remove(name)
namespace = {"__name__": "solution"}
load_error, results = None, []
try:
    exec(compile(source, "solution.py", "exec"), namespace)
except BaseException as exc:
    load_error = "".join(traceback.format_exception_only(exc)).strip()
else:
    for probe in probes:
        try:
            results.append(["value", repr(eval(compile(probe, "probe", "eval"), namespace))])
        except BaseException as exc:
            results.append(["error", "".join(traceback.format_exception_only(exc)).strip()])
sys.stdout.flush()
sys.stderr.flush()
report.write(json.dumps({"nonce": NONCE, "load_error": load_error, "results": results}) + "\\n")
report.flush()
'''
"""The program the sandbox runs: loads solution.py, evaluates probes.json, reports each probe's repr
(or its exception) on the stdout it saved before the solution ran, tagged with NONCE."""


def _free_names(node: ast.AST) -> set[str]:
    """Names read in `node` that no comprehension or lambda inside it binds."""
    bound: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.comprehension):
            bound |= {n.id for n in ast.walk(sub.target) if isinstance(n, ast.Name)}
        elif isinstance(sub, ast.Lambda):
            bound |= {a.arg for a in ast.walk(sub.args) if isinstance(a, ast.arg)}
        elif isinstance(sub, ast.NamedExpr):
            bound.add(sub.target.id)
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id not in bound}


class _Split(ast.NodeTransformer):
    """Replaces each part of an expression that needs the solution by a name `_probe<i>`."""

    def __init__(self) -> None:
        self.probes: list[ast.expr] = []
        self.bound: set[str] = set()
        """Names bound by the comprehensions and lambdas being visited."""

    def _needs_solution(self, node: ast.AST) -> bool:
        return any(name not in SAFE_BUILTINS and name not in self.bound for name in _free_names(node))

    def _probe(self, node: ast.expr) -> ast.Name:
        uses = _free_names(node) & self.bound
        if uses:
            raise ValueError(f"`{ast.unparse(node)}` uses {', '.join(sorted(uses))}, bound inside the test: "
                             "the solution's parts of a test may use only constants")
        self.probes.append(node)
        return ast.copy_location(ast.Name(f"_probe{len(self.probes) - 1}", ast.Load()), node)

    def visit_Name(self, node: ast.Name) -> ast.expr:
        if node.id in SAFE_BUILTINS or node.id in self.bound or not isinstance(node.ctx, ast.Load):
            return node
        return self._probe(node)

    def visit_Call(self, node: ast.Call) -> ast.expr:
        if isinstance(node.func, ast.Name) and node.func.id in SAFE_BUILTINS:
            return self.generic_visit(node)
        if self._needs_solution(node):  # a function it defines, or a method of something it made
            return self._probe(node)
        return self.generic_visit(node)  # a method of a plain value, e.g. 'a b'.split()

    def visit_Attribute(self, node: ast.Attribute) -> ast.expr:
        return self._probe(node) if self._needs_solution(node) else node

    def _scope(self, node: ast.expr) -> ast.expr:
        outer = self.bound
        self.bound = outer | ({n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - _free_names(node))
        try:
            return self.generic_visit(node)
        finally:
            self.bound = outer

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = visit_Lambda = _scope


class Check:
    """One test, split: `probes` (source run in the sandbox) and the rest, judged here."""

    def __init__(self, test: str, probes: list[str], expr: ast.Expression, message: ast.expr | None):
        self.test = test
        self.probes = probes
        self._code = compile(expr, "test", "eval")
        self._message = None if message is None else compile(ast.Expression(message), "message", "eval")

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def of(test: str) -> Check:
        """Split `test`; ValueError names the rule it breaks."""
        try:
            tree = ast.parse(test)
        except SyntaxError as exc:
            raise ValueError(f"test {test!r} does not parse: {exc.msg}") from None
        if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
            raise ValueError(f"test {test!r}: expected one `assert EXPR` statement")
        node = tree.body[0]
        if node.msg is not None and any(n not in SAFE_BUILTINS for n in _free_names(node.msg)):
            raise ValueError(f"test {test!r}: the assert's message may not use the solution")
        split = _Split()
        try:
            expr = split.visit(node.test)
        except ValueError as exc:
            raise ValueError(f"test {test!r}: {exc}") from None
        body = ast.fix_missing_locations(ast.Expression(expr))
        return Check(test, [ast.unparse(p) for p in split.probes], body, node.msg)

    def judge(self, results: list[tuple[str, str]]) -> str | None:
        """None if the test passes given its probes' results (("value", repr) or ("error", text)), in
        order; else why not, as the failure line's tail."""
        values: dict[str, Any] = {}
        for i, (probe, (kind, text)) in enumerate(zip(self.probes, results, strict=True)):
            if kind != "value":
                return str(text)
            try:
                values[f"_probe{i}"] = ast.literal_eval(text)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                shown = text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."
                return (f"{probe} gave {shown}, not a plain value (numbers, strings, bytes, None, and lists, "
                        "tuples, dicts and sets of them)")
        scope = {"__builtins__": SAFE_BUILTINS}
        try:
            if eval(self._code, scope, values):
                return None
            message = "" if self._message is None else str(eval(self._message, scope, {}))
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return f"AssertionError: {message}" if message else "AssertionError"
