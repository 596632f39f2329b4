"""The library's import surface: no benchmark dependency, and the format core stays torch-free."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import softmask_bench
import softmask_format

import softmask_peft

IMPORT_ALL = """
import importlib, json, pkgutil, sys
before = {m.split(".")[0] for m in sys.modules}  # imported before the package (by a preamble)
import softmask_peft
from softmask_peft import SoftMaskConfig, SoftMaskModel, SoftMaskOptimizer  # the lazy API
names = [m.name for m in pkgutil.walk_packages(softmask_peft.__path__, "softmask_peft.")]
for name in names:  # the optional integrations pull in their host libraries (checked below)
    if name != "softmask_peft.__main__" and ".integrations" not in name:
        importlib.import_module(name)
top = {m.split(".")[0] for m in sys.modules}
print(json.dumps({"modules": len(names), "top": sorted(top), "before": sorted(before)}))
"""


def _run(script: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_library_never_imports_the_benchmark_dependencies() -> None:
    result = _run(IMPORT_ALL)
    assert result["modules"] >= 15  # every module of the package was imported
    assert "torch" in result["top"]
    assert {"sklearn", "matplotlib", "mnist1d", "softmask_bench", "avalanche"} & set(
        result["top"]
    ) == set()


def test_format_core_is_stdlib_and_numpy_only() -> None:
    script = """
import json, sys
before = set(sys.modules)
import softmask_format.atomic, softmask_format.codec, softmask_format.keys
import softmask_format.names, softmask_format.version
new = {m.split(".")[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)
print(json.dumps({"top": sorted(new)}))
"""
    assert set(_run(script)["top"]) == {"numpy", "softmask_format"}


def _import_graph(packages: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> modules it imports (function-local imports included), within `packages`."""
    files = {}
    for top, root in packages.items():
        for f in root.rglob("*.py"):
            parts = [top, *f.relative_to(root).with_suffix("").parts]
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, f in files.items():
        package = module if f.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names
                ]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != module:
                    graph[module].add(t)
    return graph


def test_no_import_cycles_anywhere_function_local_imports_included() -> None:
    graph = _import_graph(
        {
            m.__name__: Path(m.__file__).parent
            for m in (softmask_peft, softmask_format, softmask_bench)
        }
        # the source only: importing softmask_edge needs ONNX Runtime (none on Python 3.13)
        | {"softmask_edge": Path(importlib.util.find_spec("softmask_edge").origin).parent}
    )
    assert len(graph) > 40
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append(path[path.index(node) :] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])
        done.add(node)

    for start in sorted(graph):
        visit(start, [])
    assert cycles == []


# The integrations' host libraries, imported first: what they import themselves is not ours.
# transformers 5.20 (the last release for Python 3.10) imports sklearn whenever it is installed
# (generation/candidate_generator.py, reached from `import peft`); 5.25 imports it lazily.
HOSTS = """
import lightning, peft, transformers
from transformers import Trainer, TrainerCallback
"""


def test_the_integrations_import_no_harness_dependency() -> None:
    # avalanche (optional extra, which itself imports sklearn) has its own check in test_avalanche
    script = IMPORT_ALL.replace('".integrations" not in name', 'not name.endswith(".avalanche")')
    result = _run(HOSTS + script)
    added = set(result["top"]) - set(result["before"])
    assert {"softmask_peft", "softmask_format"} <= added  # the package itself was imported
    assert {"transformers", "lightning"} <= set(result["top"])
    assert {"sklearn", "mnist1d", "softmask_bench"} & added == set()
    # only the hosts on Python 3.10 import sklearn themselves (see HOSTS)
    assert "sklearn" not in result["before"] or sys.version_info < (3, 11)


# Which package may import which (an arrow is "imports"), as docs/architecture.md and
# export/README.md draw it. softmask_peft reaches softmask_edge only through its device bridge,
# and only inside the functions that export or read back (the `onnx` extra is optional);
# a `TYPE_CHECKING` import for annotations is not an import at run time.
ALLOWED = {
    "softmask_format": set(),
    "softmask_edge": {"softmask_format"},
    "softmask_peft": {"softmask_format", "softmask_edge"},
    "softmask_bench": {"softmask_format", "softmask_edge", "softmask_peft"},
}
PEFT_TO_EDGE = "softmask_peft.device"  # the one module of softmask_peft that may import it
# ExecuTorch's export side: imports softmask_edge at its top, and is itself imported only inside
# softmask_peft.device's functions
PEFT_EXECUTORCH = "softmask_peft.executorch_export"


def _cross_package_imports(root: Path, top: str) -> list[tuple[str, str, bool]]:
    """(module, imported top-level package, at module level?) for every import of the others."""
    found = []
    for f in root.rglob("*.py"):
        module = ".".join([top, *f.relative_to(root).with_suffix("").parts]).removesuffix(
            ".__init__"
        )
        tree = ast.parse(f.read_text())
        checking = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        module_level = {id(n) for n in tree.body} - checking
        for node in ast.walk(tree):
            if id(node) in checking:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                other = name.split(".")[0]
                if other in ALLOWED and other != top:
                    found.append((module, other, id(node) in module_level))
    return found


def test_the_four_packages_depend_one_way() -> None:
    roots = {
        m.__name__: Path(m.__file__).parent for m in (softmask_peft, softmask_format, softmask_bench)
    }
    # located, not imported: on Python 3.13 importing the device package raises by design
    roots["softmask_edge"] = Path(importlib.util.find_spec("softmask_edge").origin).parent
    wrong = []
    peft_to_edge = []
    for top, root in roots.items():
        for module, other, at_top in _cross_package_imports(root, top):
            if other not in ALLOWED[top]:
                wrong.append(f"{module} imports {other}")
            if (top, other) == ("softmask_peft", "softmask_edge"):
                peft_to_edge.append((module, at_top))
    assert wrong == []
    # the device bridge is the one place, and it imports softmask_edge only where it needs it
    assert peft_to_edge and {m for m, _ in peft_to_edge} == {PEFT_TO_EDGE, PEFT_EXECUTORCH}
    assert not any(at_top for m, at_top in peft_to_edge if m == PEFT_TO_EDGE), peft_to_edge


def test_the_direction_check_sees_a_wrong_import(tmp_path) -> None:
    """The walker above finds a module-level import of a forbidden package (it can fail)."""
    (tmp_path / "bad.py").write_text("import softmask_peft\n")
    (tmp_path / "lazy.py").write_text("def f():\n    from softmask_edge import X\n")
    found = sorted(_cross_package_imports(tmp_path, "softmask_format"))
    assert found == [
        ("softmask_format.bad", "softmask_peft", True),
        ("softmask_format.lazy", "softmask_edge", False),
    ]
