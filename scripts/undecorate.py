"""Rewrite decorated functions so that mutmut mutates them: used by scripts/mutation.sh only.

mutmut (3.x) leaves every function with a decorator unmutated, except one whose only decorator is
``@staticmethod`` or ``@classmethod``; there is no setting to change that. The same function with
its decorators applied after the definition is mutated like any other, and behaves the same:

    @torch.no_grad()                    def nearest(self, flat): ...
    def nearest(self, flat): ...   ->   nearest = torch.no_grad()(nearest)

Decorators apply bottom first, so the assignments do too. Run on a scratch copy, never on the
tree: ``python scripts/undecorate.py FILE...`` rewrites each file in place and prints what it
rewrote. A ``@<name>.setter`` / ``.deleter`` (which needs the property of the same name at
definition time) and a lone ``@staticmethod`` / ``@classmethod`` (which mutmut handles) are left.
"""

from __future__ import annotations

import sys

import libcst as cst


def _kept(function: cst.FunctionDef) -> bool:
    decorators = [d.decorator for d in function.decorators]
    if not decorators:
        return True
    if len(decorators) == 1 and isinstance(decorators[0], cst.Name):
        if decorators[0].value in ("staticmethod", "classmethod"):
            return True
    return any(
        isinstance(d, cst.Attribute) and d.attr.value in ("setter", "deleter") for d in decorators
    )


class _Undecorate(cst.CSTTransformer):
    def __init__(self) -> None:
        self.rewritten: list[str] = []

    def _rewrite_body(self, body: list[cst.BaseStatement]) -> list[cst.BaseStatement]:
        out: list[cst.BaseStatement] = []
        for statement in body:
            if not isinstance(statement, cst.FunctionDef) or _kept(statement):
                out.append(statement)
                continue
            name = statement.name.value
            out.append(statement.with_changes(decorators=[], leading_lines=statement.leading_lines))
            for decorator in reversed(statement.decorators):
                call = cst.Call(func=decorator.decorator, args=[cst.Arg(cst.Name(name))])
                out.append(
                    cst.SimpleStatementLine(
                        [cst.Assign(targets=[cst.AssignTarget(cst.Name(name))], value=call)]
                    )
                )
            self.rewritten.append(name)
        return out

    def leave_Module(self, original: cst.Module, updated: cst.Module) -> cst.Module:
        return updated.with_changes(body=self._rewrite_body(list(updated.body)))

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        body = updated.body
        if not isinstance(body, cst.IndentedBlock):
            return updated
        return updated.with_changes(
            body=body.with_changes(body=self._rewrite_body(list(body.body)))
        )


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            module = cst.parse_module(f.read())
        transformer = _Undecorate()
        module = module.visit(transformer)
        with open(path, "w", encoding="utf-8") as f:
            f.write(module.code)
        print(
            f"{path}: decorators applied after the definition of {', '.join(transformer.rewritten) or 'nothing'}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
