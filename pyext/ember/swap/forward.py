"""The one check every swap rule makes before trusting a class to compute a known formula: does its
method's source say exactly that?

A template is the source of a method body, with ``{x}`` standing for its input argument:

    forward_matches(type(m), "return self.act({x})")
    method_matches(m.act, "return {x} * 0.5 * (1.0 + torch.erf({x} / math.sqrt(2.0)))")

A method matches when it takes ``(self, x)`` and nothing else, has no decorators and no wrapper
(``__wrapped__``: its source would be the wrapped function's, not what runs), and its body, without
docstrings, equals one of the templates statement for statement. Bodies are compared as syntax trees,
so layout, comments, type hints and the input's name do not matter, while every attribute, call,
constant and operator does. One rewrite applies to both sides, because transformers writes it both
ways: a body ending in ``v = <expr>; return v`` reads as ``return <expr>``.

Without source to read (a builtin, a class made in a REPL, a forward patched in from C) nothing
matches: a rule must not guess.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap


def forward_matches(cls: type, *templates: str) -> bool:
    """``cls.forward`` (as the class resolves it) is exactly one of ``templates``."""
    return method_matches(getattr(cls, "forward", None), *templates)


def method_matches(fn, *templates: str) -> bool:
    """``fn`` (a function taking ``(self, x)``, or such a function bound to an instance) is exactly
    one of ``templates``."""
    fn = getattr(fn, "__func__", fn)  # a bound method: judge the function it calls
    if not inspect.isfunction(fn) or hasattr(fn, "__wrapped__"):
        return False
    return _matches(fn, templates)


@functools.lru_cache(maxsize=None)
def _matches(fn, templates: tuple[str, ...]) -> bool:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef) or node.decorator_list:
        return False
    a = node.args
    if a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or a.defaults or len(a.args) != 2:
        return False
    x = a.args[1].arg
    got = _canonical(node.body)
    return any(got == _canonical(ast.parse(textwrap.dedent(t).replace("{x}", x)).body) for t in templates)


def body_matches(fn, *templates: str) -> bool:
    """The body of ``fn`` (any signature; unwrapped through its decorators) is exactly one of
    ``templates`` (bodies written as the function's own source, docstrings dropped). For methods whose
    signature a caller checks separately, e.g. a ``*ForCausalLM.forward``."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    if not inspect.isfunction(fn):
        return False
    return _body_matches(fn, templates)


@functools.lru_cache(maxsize=None)
def _body_matches(fn, templates: tuple[str, ...]) -> bool:
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return False
    if not isinstance(node, ast.FunctionDef):
        return False
    got = _canonical(node.body)
    return any(got == _canonical(ast.parse(textwrap.dedent(t)).body) for t in templates)


def decorator_sources(fn) -> frozenset[str] | None:
    """The decorators written above ``fn``'s definition (as source text), or None without source."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    return frozenset(ast.unparse(d) for d in getattr(node, "decorator_list", ()))


def _canonical(body: list[ast.stmt]) -> list[str]:
    """The body as comparable text: docstrings dropped, a trailing ``v = e; return v`` as ``return e``."""
    body = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) >= 2:
        assign, ret = body[-2], body[-1]
        if (
            isinstance(assign, ast.Assign)
            and len(assign.targets) == 1
            and isinstance(assign.targets[0], ast.Name)
            and isinstance(ret, ast.Return)
            and isinstance(ret.value, ast.Name)
            and ret.value.id == assign.targets[0].id
        ):
            body = body[:-2] + [ast.Return(value=assign.value)]
    return [ast.dump(s) for s in body]
