"""The package's parts import one way, from the ground up, and library code never imports vla_energy.testing.

Every `import` / `from ... import` of vla_energy in the package is read from the source (those inside functions
too) and mapped to the part it names (`vla_energy.<part>`). A part may import itself and the parts below it in
LAYERS; an import of a part above it is a violation, and so is any cycle between parts.
"""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vla_energy"
# From the ground up (design.md section 3): a part may use the parts before it, never one after it.
LAYERS = ["checks", "data", "backbones", "losses", "modeling", "inference", "evaluation", "sim", "training", "cli"]
# Test utilities: they may import anything, library code never imports them.
TEST_ONLY = "testing"


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported vla_energy module) for every import in the file, at any depth (relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "vla_energy"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                name = _module_name(path)
                package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "vla_energy":
                continue
            if module == "vla_energy":  # `from vla_energy import testing` names the part in the alias
                found += [(node.lineno, f"vla_energy.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, module))
    return found


def _edges() -> dict[tuple[str, str], list[str]]:
    """(importing part, imported part) -> the places, for imports between different parts."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _part(_module_name(path))
        for line, module in _imports(path):
            target = _part(module)
            if target not in (source, "__init__") and source != "__init__":
                edges[(source, target)].append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    return edges


def test_every_part_has_a_layer() -> None:
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert parts - {TEST_ONLY} == set(LAYERS), "a new part needs its place in LAYERS (and in design.md)"


def test_no_part_imports_a_part_above_it() -> None:
    up = [place for (source, target), places in _edges().items() if source != TEST_ONLY and target != TEST_ONLY
          and LAYERS.index(target) > LAYERS.index(source) for place in places]
    assert not up, "imports against the layers " + " > ".join(LAYERS) + ":\n" + "\n".join(up)


def test_no_cycle_between_parts() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target in _edges():
        graph[source].add(target)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            pytest.fail("a cycle between parts: " + " -> ".join(cycle[cycle.index(cycle[-1]):]))


def test_library_code_never_imports_the_test_utilities() -> None:
    bad = [place for (source, target), places in _edges().items() if target == TEST_ONLY for place in places]
    assert not bad, "library code imports vla_energy.testing:\n" + "\n".join(bad)


def test_the_reader_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from vla_energy.training import train\n    import vla_energy.sim.rollout\n")
    assert [m for _, m in _imports(module)] == ["vla_energy.training", "vla_energy.sim.rollout"]
