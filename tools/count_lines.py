"""Lines of Python under a folder, split into code, docstrings, comments and blank lines.

    python tools/count_lines.py [src] [--files]

"total" is what ``wc -l`` counts. "code" is every line that is not blank, not a comment line and not inside a
module, class or function docstring (blank lines inside a docstring count as docstring), so that shortening prose
and removing code can be told apart.
"""

from __future__ import annotations

import argparse
import ast
import io
import tokenize
from pathlib import Path

KINDS = ("total", "blank", "comment", "doc", "code")


def count(source: str) -> dict[str, int]:
    doc_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str):
                doc_lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    comment_lines = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                     if tok.type == tokenize.COMMENT and tok.line.strip().startswith("#")}
    counts = dict.fromkeys(KINDS, 0)
    counts["total"] = source.count("\n")
    for number, line in enumerate(source.splitlines(), 1):
        kind = ("doc" if number in doc_lines else "blank" if not line.strip()
                else "comment" if number in comment_lines else "code")
        counts[kind] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="src", help="folder to count (default: src)")
    parser.add_argument("--files", action="store_true", help="also one line per file, largest code last")
    args = parser.parse_args()
    rows = [(count(p.read_text()), p) for p in sorted(Path(args.root).rglob("*.py"))]
    if args.files:
        for counts, path in sorted(rows, key=lambda row: row[0]["code"]):
            print(" ".join(f"{counts[k]:6d}" for k in KINDS), path)
    print(" ".join(f"{k} {sum(c[k] for c, _ in rows)}" for k in KINDS))


if __name__ == "__main__":
    main()
