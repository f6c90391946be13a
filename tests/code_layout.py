"""The project's structure, read with ast and pathlib (nothing is imported): the checks
tests/test_code_layout.py holds the tree to. Every function takes the repository root, so the same checks run
on a planted tree in a test.

- ``wrong_way_imports``: imports point only ``jobs -> cluster -> workers -> qvlm`` and ``qvlm`` imports
  neither ray, boto3 nor botocore; imports inside functions count too.
- ``import_cycles``: groups of modules that import each other, directly or through others.
- ``size_findings``: functions over the line budget, and the 90th percentile of function lengths.
- ``map_findings``: the README's map of the tree (the ``` block under "## Map of the tree") names every
  module of the four packages once, and no module that does not exist.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

LAYERS = ("qvlm", "workers", "cluster", "jobs")  # each may import only the layers before it
FORBIDDEN = {"qvlm": ("ray", "boto3", "botocore")}
MAP_HEADING = "## Map of the tree"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted (a package's __init__ under the package's name)
    target: str  # what it imports, dotted and absolute: ``qvlm.quant.WeightScheme``
    where: str  # ``qvlm/x.py:12``


def modules(root: Path) -> dict[str, Path]:
    """Every module of the four packages: dotted name -> file."""
    found = {}
    for layer in LAYERS:
        for path in sorted((Path(root) / layer).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The dotted module a ``from`` import names, relative imports resolved against ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root: Path) -> list[Import]:
    """Every import statement of the four packages, at module level or inside functions."""
    found = []
    for module, path in modules(root).items():
        for node in ast.walk(_parse(path)):
            where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                found += [Import(module, alias.name, where) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(module, path.name == "__init__.py", node)
                found += [Import(module, f"{source}.{alias.name}", where) for alias in node.names]
    return found


def wrong_way_imports(root: Path) -> list[str]:
    """One line per import that points outward (``qvlm`` importing ``cluster``) or leaves a layer's bounds."""
    findings = []
    for imp in imports(root):
        layer, top = imp.module.split(".")[0], imp.target.split(".")[0]
        if top in LAYERS and LAYERS.index(top) > LAYERS.index(layer):
            findings.append(f"{imp.where}: {layer} imports {imp.target} (jobs -> cluster -> workers -> qvlm)")
        if top in FORBIDDEN.get(layer, ()):
            findings.append(f"{imp.where}: {layer} imports {top}")
    return findings


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules it imports (the longest dotted prefix of each import that is a module)."""
    known = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in known}
    for imp in imports(root):
        parts = imp.target.split(".")
        prefixes = (".".join(parts[:k]) for k in range(len(parts), 0, -1))
        target = next((p for p in prefixes if p in known), None)
        if target is not None and target != imp.module:
            graph[imp.module].add(target)
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def import_cycles(root: Path) -> list[list[str]]:
    """Each group of two or more modules that reach each other through imports, sorted."""
    graph = import_graph(root)
    reach = {m: _reachable(graph, m) for m in graph}
    groups = {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in graph if m in reach[m]}
    return sorted(sorted(g) for g in groups)


def function_lengths(root: Path) -> list[tuple[str, int]]:
    """(``path:line name``, lines from ``def`` to the last line) for every function and method, nested ones too."""
    found = []
    for path in modules(root).values():
        for node in ast.walk(_parse(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((f"{path.relative_to(root)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1))
    return found


def percentile(values: list[int], q: float) -> int:
    """The value below which a share ``q`` of ``values`` lies (nearest rank, rounded down); 0 for none."""
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))] if ordered else 0


def size_findings(root: Path, longest: int = 60, p90_below: int = 30) -> list[str]:
    """Functions longer than ``longest`` lines, and a 90th percentile of ``p90_below`` lines or more."""
    lengths = function_lengths(root)
    findings = [f"{name}: {n} lines (budget {longest})" for name, n in lengths if n > longest]
    p90 = percentile([n for _, n in lengths], 0.9)
    if p90 >= p90_below:
        findings.append(f"90th percentile of function lengths is {p90} lines (budget: under {p90_below})")
    return findings


def map_block(readme: Path) -> list[str]:
    """The lines of the first ``` block under the map's heading; [] when there is none."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == MAP_HEADING), None)
    if start is None:
        return []
    fences = [i for i in range(start + 1, len(lines)) if lines[i].startswith("```")][:2]
    return lines[fences[0] + 1 : fences[1]] if len(fences) == 2 else []


def map_entries(readme: Path) -> list[str]:
    """The files the map names, as paths: a line's first word is a folder (``report/``) or a file, two spaces
    of indent per level below the folder above it (``  stage.py  ...`` under ``qvlm/`` is ``qvlm/stage.py``)."""
    folders: list[str] = []
    entries = []
    for line in map_block(readme):
        if not line.strip():
            continue
        depth, word = (len(line) - len(line.lstrip(" "))) // 2, line.split()[0]
        folders = folders[:depth]
        if word.endswith("/"):
            folders.append(word)
        else:
            entries.append("".join(folders) + word)
    return entries


def map_findings(root: Path) -> list[str]:
    """What the README's map gets wrong about the modules of the four packages (``__init__.py`` aside: the
    package's own line stands for it)."""
    root = Path(root)
    if not map_block(root / "README.md"):
        return [f"README.md: no ``` block under {MAP_HEADING!r}"]
    entries = [e for e in map_entries(root / "README.md") if e.split("/")[0] in LAYERS]
    listed = [e for e in entries if e.endswith(".py")]
    actual = {str(p.relative_to(root)) for p in modules(root).values() if p.name != "__init__.py"}
    findings = [f"README.md map: {e!r} is not one module's file name (one module per line)" for e in entries
                if ".py" in e and not e.endswith(".py")]
    findings += [f"README.md map: {m} is missing" for m in sorted(actual - set(listed))]
    findings += [f"README.md map: {m} does not exist" for m in sorted(set(listed) - actual)]
    findings += [f"README.md map: {m} is listed {listed.count(m)} times" for m in sorted(set(listed))
                 if listed.count(m) > 1]
    return findings
