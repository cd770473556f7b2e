"""The package's import structure: no import circle anywhere in ``raysweep`` (module-level and
function-level imports alike), the modules of ``raysweep/sweep/`` importing only the ones below
them, each of them importable alone, and each idea of the sweep defined in one place."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "raysweep"
# raysweep/sweep/, bottom to top: a module may import only the ones before it.
SWEEP_ORDER = ["storage", "results", "schedule", "space", "export", "cluster", "summary", "mlflow_store", "generations", "tracking", "mlflow_ui", "console",
               "trial", "modelcheck", "plan", "tuner", "report_data", "plots", "report"]
# The commands and the old module paths sit on top of raysweep.sweep; nothing in it imports them.
ON_TOP = {"raysweep.tune", "raysweep.tracking", "raysweep.trial", "raysweep.report", "raysweep.cli",
          "raysweep.evaluate", "raysweep.unlearn"}


def _modules() -> dict[str, Path]:
    out = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = file
    return out


MODULES = _modules()


def _imports(name: str, file: Path) -> set[str]:
    """The raysweep modules ``name`` imports, anywhere in the file."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    out = set()
    for module in found:
        while module and module not in MODULES:
            module = module.rpartition(".")[0]
        if module and module not in (name, "raysweep"):
            out.add(module)
    return out


GRAPH = {name: _imports(name, file) for name, file in MODULES.items()}


def _cycle_from(start: str) -> list[str] | None:
    stack = [(start, [start])]
    seen = set()
    while stack:
        node, path = stack.pop()
        for nxt in GRAPH[node]:
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_the_graph_is_read():
    assert "raysweep.sweep.results" in GRAPH["raysweep.sweep.summary"]
    assert "raysweep.sweep.tracking" in GRAPH["raysweep.sweep.tuner"]
    assert "raysweep.sweep.generations" in GRAPH["raysweep.sweep.trial"]  # a function-level import


def test_no_import_circle_in_the_package():
    cycles = [c for name in sorted(GRAPH) if (c := _cycle_from(name))]
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", SWEEP_ORDER)
def test_sweep_imports_point_downwards(module):
    name = f"raysweep.sweep.{module}"
    below = {f"raysweep.sweep.{m}" for m in SWEEP_ORDER[: SWEEP_ORDER.index(module)]}
    sweep_imports = {m for m in GRAPH[name] if m.startswith("raysweep.sweep")}
    assert sweep_imports <= below, f"{name} imports {sorted(sweep_imports - below)} (not below it)"
    assert not GRAPH[name] & ON_TOP, f"{name} imports {sorted(GRAPH[name] & ON_TOP)}"


def test_the_sweep_package_lists_every_module():
    files = {f.stem for f in (PACKAGE / "sweep").glob("*.py")} - {"__init__"}
    assert files == set(SWEEP_ORDER)


def test_each_sweep_module_imports_alone():
    names = [f"raysweep.sweep.{m}" for m in SWEEP_ORDER] + sorted(ON_TOP)
    script = ("import importlib, subprocess, sys\n"
              "bad = []\n"
              "for name in sys.argv[1:]:\n"
              "    p = subprocess.run([sys.executable, '-c', f'import {name}'], capture_output=True, text=True)\n"
              "    if p.returncode: bad.append(name + ': ' + (p.stderr.strip().splitlines() or ['?'])[-1])\n"
              "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", script, *names], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _definitions(name: str) -> list[str]:
    """Modules of the package that define ``name`` (a function, class or module-level assignment)."""
    out = []
    for module, file in MODULES.items():
        tree = ast.parse(file.read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                out.append(module)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    elts = target.elts if isinstance(target, ast.Tuple) else [target]
                    if any(isinstance(e, ast.Name) and e.id == name for e in elts):
                        out.append(module)
    return out


@pytest.mark.parametrize("name, home", [
    ("pareto_front", "raysweep.sweep.results"),
    ("early_stopped", "raysweep.sweep.results"),
    ("error_reason", "raysweep.sweep.results"),
    ("result_step", "raysweep.sweep.results"),
    ("sampled_params", "raysweep.sweep.results"),
    ("TUNE_KEYS", "raysweep.sweep.results"),
    ("FINISHED", "raysweep.sweep.results"),
    ("is_remote", "raysweep.sweep.storage"),
    ("read_json", "raysweep.sweep.storage"),
    ("write_json", "raysweep.sweep.storage"),
    ("objective", "raysweep.eval.metrics"),
    ("IGNORE_INDEX", "raysweep.data.formatting"),
    ("uses_beta", "raysweep.sweep.space"),  # reads Method.uses_beta of raysweep.losses
    ("greedy_generate", "raysweep.prepare"),  # a thin caller of eval.generation.generate_batched
])
def test_one_definition_of_each_idea(name, home):
    assert _definitions(name) == [home]


def test_no_objective_formula_outside_metrics():
    formula = re.compile(r"""\[["']MU["']\]\s*\+\s*[\w.\[\]"']*\[["']FE["']\]\s*\)\s*/\s*2""")
    offenders = [m for m, f in MODULES.items() if formula.search(f.read_text())]
    assert offenders == []
