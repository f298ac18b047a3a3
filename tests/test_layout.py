"""The folders' layering and the module import graph, read from the source (ast).

tools -> runners -> pipelines -> transforms: a module imports only from its own folder or
the folders to its right, and no chain of imports leads back to where it started
(the supervisor once re-entered the entry point: main -> local -> workers -> main).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("transforms", "pipelines", "runners", "tools")  # each may import those before it


def _modules() -> dict[str, Path]:
  found = {}
  for package in LAYERS:
    for path in sorted((REPO / package).rglob("*.py")):
      parts = list(path.relative_to(REPO).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts.pop()
      found[".".join(parts)] = path
  return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
  """The project modules name imports, anywhere in its file (function bodies included)."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
      continue
    for target in targets:
      while target and target not in known:  # `import a.b.c` of a non-module name: its module
        target = target.rpartition(".")[0]
      if target and target != name:
        out.add(target)
  return out


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _layer(module: str) -> int:
  return LAYERS.index(module.split(".")[0])


def test_the_graph_sees_the_known_edges():
  # Guards the parser itself: a graph without edges would pass every check below.
  graph = _graph()
  assert "runners.local" in graph["runners.main"]
  assert "runners.workers" in graph["runners.local"]
  assert "pipelines.smartgrid" in graph["runners.rounds"]
  assert "transforms.telemetry" in graph["transforms.kafka.read"]
  assert len(graph) > 40


def test_every_module_imports():
  for name in _modules():
    importlib.import_module(name)


def test_imports_respect_the_layering():
  wrong = sorted(
    f"{m} -> {t}" for m, targets in _graph().items() for t in targets if _layer(t) > _layer(m)
  )
  assert not wrong, "imports against tools -> runners -> pipelines -> transforms: " + ", ".join(
    wrong
  )


def _cycle(graph: dict[str, set[str]]) -> list[str]:
  """One import cycle as a path (first == last), or [] (iterative DFS, three colours)."""
  state: dict[str, int] = {}  # 1 on the stack, 2 done
  for root in sorted(graph):
    if state.get(root):
      continue
    stack = [(root, iter(sorted(graph[root])))]
    state[root] = 1
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        state[node] = 2
        stack.pop()
      elif state.get(child) == 1:
        path = [n for n, _ in stack]
        return path[path.index(child) :] + [child]
      elif not state.get(child):
        state[child] = 1
        stack.append((child, iter(sorted(graph.get(child, ())))))
  return []


def test_no_import_cycle():
  assert _cycle(_graph()) == []


@pytest.mark.parametrize(
  "graph, expected",
  [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"b"}}, []),
  ],
)
def test_the_cycle_check_finds_a_cycle(graph, expected):
  assert _cycle(graph) == expected


# Option declarations are a list, not logic: the only functions allowed to be long.
LONG_ALLOWED = {("pipelines/options.py", "_add_argparse_args"), ("tools/chaos.py", "parse_args")}


@pytest.mark.parametrize("folder", ["transforms", "pipelines", "runners", "tools"])
def test_no_function_over_60_lines(folder):
  long = []
  for path in sorted((REPO / folder).rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > 60 and (str(path.relative_to(REPO)), node.name) not in LONG_ALLOWED:
          long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
  assert not long, ", ".join(long)
