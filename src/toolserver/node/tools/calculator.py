"""calculator: safe arithmetic by walking the expression's syntax tree (nothing is ever eval'd)."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from toolserver.errors import ToolArgumentError, ToolError
from toolserver.node.registry import tool

MAX_EXPRESSION = 2000
MAX_INT_BITS = 12_000  # ~3600 digits: below Python's int -> str limit
MAX_FACTORIAL = 1000

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _factorial(n: Any) -> int:
    if not float(n).is_integer() or n < 0:
        raise ValueError("factorial() needs a non-negative whole number")
    if n > MAX_FACTORIAL:
        raise ValueError(f"factorial() is limited to n <= {MAX_FACTORIAL}")
    return math.factorial(int(n))


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log": math.log,
    "ln": math.log,
    "log10": math.log10,
    "log2": math.log2,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "sinh": math.sinh,
    "cosh": math.cosh,
    "tanh": math.tanh,
    "degrees": math.degrees,
    "radians": math.radians,
    "abs": abs,
    "round": round,
    "floor": math.floor,
    "ceil": math.ceil,
    "factorial": _factorial,
    "min": min,
    "max": max,
    "hypot": math.hypot,
    "gcd": math.gcd,
}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}


def _check_size(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise ValueError(f"the result is too large (more than {MAX_INT_BITS} bits)")
    return value


def _power(base: Any, exp: Any) -> Any:
    huge = isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1
    if huge and exp * math.log2(abs(base)) > MAX_INT_BITS:
        raise ValueError(f"{base} ** {exp} is too large (more than {MAX_INT_BITS} bits)")
    if isinstance(exp, int | float) and abs(exp) > 100_000:
        raise ValueError("the exponent is too large")
    result = operator.pow(base, exp)
    if isinstance(result, complex):
        raise ValueError("the result is not a real number")
    return result


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return _check_size(node.value)
        raise ToolArgumentError(f"argument 'expression': {node.value!r} is not a number")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        ints = isinstance(left, int) and isinstance(right, int)
        if (
            isinstance(node.op, ast.Mult)
            and ints
            and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1
        ):
            raise ValueError(f"the result is too large (more than {MAX_INT_BITS} bits)")
        return _check_size(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        if node.keywords:
            raise ToolArgumentError("argument 'expression': functions take positional arguments only")
        args = [_eval(arg) for arg in node.args]
        return _check_size(_FUNCTIONS[node.func.id](*args))
    what = ast.unparse(node) if hasattr(ast, "unparse") else type(node).__name__
    raise ToolArgumentError(
        f"argument 'expression': {what!r} is not allowed; use numbers, + - * / // % **, parentheses, "
        f"the constants {', '.join(_CONSTANTS)} and the functions {', '.join(_FUNCTIONS)}"
    )


@tool(inline=True)  # bounded: MAX_EXPRESSION characters, MAX_INT_BITS per value
def calculator(expression: str) -> int | float | str:
    """Evaluate an arithmetic expression exactly as written and return the number.

    Supports + - * / // % ** (power), parentheses, pi, e, and math functions such as sqrt, log, sin,
    cos, exp, floor, ceil, round, abs, factorial, min, max. Example: calculator('(2 + 3) * sqrt(16)') -> 20.0

    Args:
        expression: The arithmetic expression, e.g. '2 ** 10 / 4'.
    """
    text = expression.strip().replace("^", "**")
    if not text:
        raise ToolArgumentError("argument 'expression': empty expression")
    if len(text) > MAX_EXPRESSION:
        raise ToolArgumentError(f"argument 'expression': longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ToolArgumentError(f"argument 'expression': not a valid expression ({exc.msg})") from None
    except (RecursionError, MemoryError):
        raise ToolArgumentError("argument 'expression': nested too deeply") from None
    try:
        result = _eval(tree)
    except RecursionError:
        raise ToolArgumentError("argument 'expression': nested too deeply") from None
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (ValueError, OverflowError, TypeError) as exc:
        raise ToolError(f"cannot compute {expression!r}: {exc}") from None
    if isinstance(result, float) and not math.isfinite(result):
        return str(result)
    return result
