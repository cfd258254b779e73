"""The import structure of the empssl package, read from its source (nothing is imported).

    python tools/import_graph.py [src/empssl]          # one line per module: what it imports from empssl
    python tools/import_graph.py --dot > imports.dot    # the same as a Graphviz graph

Imports at module level and those not run when the module is imported (inside functions or under
``if TYPE_CHECKING:``, marked ``~``) are listed separately. The last lines name the cycles (strongly connected
components over all imports, both kinds: a type-only import is a dependency too) and the leaves (modules that
import nothing from empssl).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def resolve(current: str, is_package: bool, node: ast.ImportFrom, modules: set[str]) -> list[str]:
    """The empssl modules an ``from ... import ...`` names (a name may itself be a submodule)."""
    if node.level == 0:
        if not (node.module or "").startswith("empssl"):
            return []
        base = (node.module or "").removeprefix("empssl").lstrip(".")
    else:
        pkg = current.split(".") if is_package else current.split(".")[:-1]
        if current == "__init__":
            pkg = []
        pkg = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
        base = ".".join([*pkg, node.module] if node.module else pkg)
    found = []
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        if sub in modules:
            found.append(sub)
        elif base in modules:
            found.append(base)
        elif not base:
            found.append("__init__")
    return found


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(root: Path) -> dict[str, dict[str, bool]]:
    """module -> {imported module: True if at module level, False if only inside a function or for type checking}."""
    files = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in files}
    graph: dict[str, dict[str, bool]] = {}
    for path in files:
        name = module_name(path, root)
        tree = ast.parse(path.read_text())
        edges: dict[str, bool] = {}

        def visit(node: ast.AST, top: bool, name: str = name, path: Path = path, edges: dict = edges) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ImportFrom):
                    for target in resolve(name, path.name == "__init__.py", child, modules):
                        if target != name:
                            edges[target] = edges.get(target, False) or top
                elif isinstance(child, ast.Import):
                    for alias in child.names:
                        target = alias.name.removeprefix("empssl").lstrip(".")
                        if alias.name.startswith("empssl") and target in modules and target != name:
                            edges[target] = edges.get(target, False) or top
                inner = top and not (isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                                     or _type_checking_block(child))
                visit(child, inner)

        visit(tree, True)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1] / "src" / "empssl"))
    ap.add_argument("--dot", action="store_true", help="print a Graphviz graph instead")
    args = ap.parse_args(argv)
    root = Path(args.root)
    if not (root / "__init__.py").is_file():
        print(f"error: {root} is not a package folder", file=sys.stderr)
        return 2
    graph = imports(root)
    if args.dot:
        print("digraph empssl {")
        for m, edges in sorted(graph.items()):
            for t, top in sorted(edges.items()):
                print(f'  "{m}" -> "{t}"' + ("" if top else " [style=dashed]") + ";")
        print("}")
        return 0
    width = max(map(len, graph))
    for m, edges in sorted(graph.items()):
        names = [t if top else f"~{t}" for t, top in sorted(edges.items())]
        print(f"{m:<{width}}  {', '.join(names) or '-'}")
    found = cycles(graph)
    print("cycles:", "; ".join(" <-> ".join(c) for c in found) if found else "none")
    print("leaves:", ", ".join(m for m, e in sorted(graph.items()) if not e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
