"""bridge.py reads top to bottom: its sections are a table of contents, each short, each below what it uses."""
from __future__ import annotations

import ast
import builtins
import os
import re
import symtable

SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bridge.py")
BANNER = "# " + "=" * 101
MAX_SECTION_LINES = 400


def read_source() -> str:
    with open(SOURCE, encoding="utf-8") as f:
        return f.read()


def sections(text: str) -> list[tuple[str, int, int]]:
    """(name, first line, last line) of every section: a name between two banner rules, up to the next."""
    lines = text.splitlines()
    starts = [(lines[i + 1][2:].strip(), i + 1) for i in range(len(lines) - 2)
              if lines[i] == BANNER and lines[i + 2] == BANNER]
    ends = [start - 1 for _, start in starts[1:]] + [len(lines)]
    return [(name, start, end) for (name, start), end in zip(starts, ends, strict=True)]


def toc(text: str) -> list[str]:
    """The section names the module docstring lists: indented lines `    Name    what it holds`."""
    doc = ast.get_docstring(ast.parse(text)) or ""
    block = doc.split("Contents:", 1)[1].split("\n\n\n", 1)[0] if "Contents:" in doc else ""
    return [re.split(r"\s{2,}", line.strip())[0] for line in block.splitlines() if line.startswith("    ")]


def global_names(table: symtable.SymbolTable) -> set[str]:
    """Names a scope and its nested scopes read from the module (symtable knows what is local)."""
    found = {s.get_name() for s in table.get_symbols()
             if s.is_referenced() and (s.is_global() or (table.get_type() == "class" and not s.is_assigned()))}
    for child in table.get_children():
        found |= global_names(child)
    return found


def annotation_names(node: ast.AST) -> set[str]:
    """Names in annotations, which `from __future__ import annotations` leaves unevaluated (and symtable
    unseen): a forward reference there reads as badly as one in code."""
    found: set[str] = set()
    for sub in ast.walk(node):
        for annotation in _annotations(sub):
            for part in ast.walk(annotation):
                if isinstance(part, ast.Name):
                    found.add(part.id)
                elif isinstance(part, ast.Constant) and isinstance(part.value, str):
                    found |= {n.id for n in ast.walk(ast.parse(part.value, mode="eval")) if isinstance(n, ast.Name)}
    return found


def _annotations(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs, node.args.vararg, node.args.kwarg]
        return [a.annotation for a in args if a is not None and a.annotation is not None] + \
            ([node.returns] if node.returns is not None else [])
    if isinstance(node, ast.AnnAssign):
        return [node.annotation]
    return []


def defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
        node, (ast.AnnAssign, ast.AugAssign)) else []
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def forward_references(text: str) -> list[str]:
    """Every use of a module-level name above the section that defines it."""
    tree = ast.parse(text)
    bounds = sections(text)

    def section_of(line: int) -> int:
        return next((i for i, (_, start, end) in enumerate(bounds) if start <= line <= end), -1)

    where: dict[str, int] = {}
    for node in tree.body:
        for name in defined_names(node):
            where.setdefault(name, section_of(node.lineno))
    scopes = {(child.get_name(), child.get_lineno()): child for child in symtable.symtable(text, SOURCE, "exec").get_children()}
    problems = []
    for node in tree.body:
        used = annotation_names(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = scopes.get((node.name, node.lineno)) or next(
                (s for (name, _), s in scopes.items() if name == node.name), None)
            used |= global_names(scope) if scope is not None else set()
            used |= {n.id for d in node.decorator_list for n in ast.walk(d) if isinstance(n, ast.Name)}
        else:
            used |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        here = section_of(node.lineno)
        for name in sorted(used - set(dir(builtins))):
            if where.get(name, -1) > here:
                problems.append(f"line {node.lineno}: {name} (section {bounds[here][0]!r}) is defined below, "
                                f"in {bounds[where[name]][0]!r}")
    return problems


def test_no_name_is_used_above_the_section_that_defines_it():
    assert forward_references(read_source()) == []


def test_no_section_is_longer_than_400_lines():
    long = [(name, end - start + 1) for name, start, end in sections(read_source())
            if end - start + 1 > MAX_SECTION_LINES]
    assert long == []


def test_the_docstring_lists_the_sections_in_order():
    text = read_source()
    assert toc(text) == [name for name, _, _ in sections(text)]


def test_no_function_is_longer_than_60_lines():
    long = [(node.name, node.lineno, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(read_source()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (node.end_lineno or 0) - node.lineno >= 60]
    assert long == []


def test_no_function_is_more_complex_than_15():
    from radon.complexity import cc_visit

    def blocks(items):
        for item in items:
            yield item
            yield from blocks(getattr(item, "methods", []) + getattr(item, "closures", []))

    complex_ = [(b.name, b.lineno, b.complexity) for b in blocks(cc_visit(read_source())) if b.complexity > 15]
    assert complex_ == []
