"""The calculator tool the chat model calls as <|python_start|>expr<|python_end|>: safe arithmetic, never code.

One implementation for both sides of it: the engine answers the model's calls with it, and the generated
arithmetic tasks compute their reference outputs with it, so training shows the model exactly the outputs
(format included: 36, not 36.0) that it will get at inference.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_EXPR_CHARS = 128
MAX_DIGITS = 50  # no value in a calculation may exceed 10**MAX_DIGITS: keeps every step cheap and the output short
_LIMIT = 10**MAX_DIGITS

_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _evaluate(node: ast.AST) -> int | float:
    """Evaluate an arithmetic AST; anything but numbers and the allowed operators raises ValueError."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # type(): bool is an int subclass
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        value = _UNARY_OPS[type(node.op)](_evaluate(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        # bound a power before computing it: 9**9**9 would otherwise run for minutes and fill memory
        if isinstance(node.op, ast.Pow) and abs(left) > 1 and right > 0 and right * math.log10(abs(left)) > MAX_DIGITS:
            raise ValueError("power too large")
        value = _BINARY_OPS[type(node.op)](left, right)
    else:
        raise ValueError(f"not allowed: {type(node).__name__}")
    # a negative base to a fractional power is complex; inf and nan are no answer either
    if type(value) not in (int, float) or abs(value) > _LIMIT or not math.isfinite(value):
        raise ValueError("result out of range")
    return value


def _format(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # 36.0 -> "36"
    if isinstance(value, float):
        return f"{value:.10g}"  # 0.1 + 0.2 -> "0.3"
    return str(value)


def calculate(expr: str) -> str | None:
    """The calculator tool: the value of an arithmetic expression as text, or None if it is not one we evaluate.

    Only numbers, + - * / // % **, unary signs and parentheses; commas (thousands separators, as in GSM8K's
    "1,200*3") are dropped. Never raises, never runs code."""
    expr = expr.replace(",", "").strip()
    if not expr or len(expr) > MAX_EXPR_CHARS:
        return None
    try:
        return _format(_evaluate(ast.parse(expr, mode="eval").body))
    except (SyntaxError, ValueError, TypeError, ArithmeticError, RecursionError, MemoryError):
        return None
