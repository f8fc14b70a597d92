"""Read string constants out of a Python source file without running it.

The released critics' prompts live in Python modules. Executing a downloaded file would run
whatever it holds, so the file is parsed instead, and only module-level assignments whose value
is built from string literals, `+` and names assigned earlier in the same way are evaluated.
Anything else is skipped, and asking for a name that was skipped is an error.

>>> constants('A = "x"\\nB = (A + "y"\\n     "z")\\nC = f"{A}"\\n')
{'A': 'x', 'B': 'xyz'}
"""

from __future__ import annotations

import ast


class SourceError(ValueError):
    """The source does not parse, or does not define a wanted string constant."""


def _evaluate(node: ast.expr, known: dict[str, str]) -> str | None:
    """The string `node` stands for, or None when it is anything but literals, `+` and known names."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return known.get(node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _evaluate(node.left, known), _evaluate(node.right, known)
        return None if left is None or right is None else left + right
    return None


def constants(source: str, origin: str = "<source>") -> dict[str, str]:
    """Every module-level `NAME = <string expression>` of `source`, in order of assignment."""
    try:
        tree = ast.parse(source, filename=origin)
    except SyntaxError as exc:
        raise SourceError(f"{origin} is not valid Python: {exc.msg} (line {exc.lineno})") from exc
    known: dict[str, str] = {}
    for statement in tree.body:
        if not isinstance(statement, ast.Assign):
            continue
        value = _evaluate(statement.value, known)
        for target in statement.targets:
            if isinstance(target, ast.Name):
                if value is None:
                    known.pop(target.id, None)  # reassigned to something we do not evaluate
                else:
                    known[target.id] = value
    return known


def constant(source: str, name: str, origin: str = "<source>") -> str:
    """The string constant `name` of `source`; raises SourceError naming what is missing."""
    found = constants(source, origin)
    if name not in found:
        raise SourceError(f"{origin} defines no string constant {name} (found: {', '.join(found) or 'none'})")
    return found[name]
