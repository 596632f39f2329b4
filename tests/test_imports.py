"""The library's import surface: no benchmark dependency, and the format core stays torch-free."""

from __future__ import annotations

import json
import subprocess
import sys

IMPORT_ALL = """
import importlib, json, pkgutil, sys
import softmask_peft
from softmask_peft import SoftMaskConfig, SoftMaskModel, SoftMaskOptimizer  # the lazy API
names = [m.name for m in pkgutil.walk_packages(softmask_peft.__path__, "softmask_peft.")]
for name in names:
    if name != "softmask_peft.__main__":
        importlib.import_module(name)
top = {m.split(".")[0] for m in sys.modules}
print(json.dumps({"modules": len(names), "top": sorted(top)}))
"""


def _run(script: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_library_never_imports_the_benchmark_dependencies() -> None:
    result = _run(IMPORT_ALL)
    assert result["modules"] >= 15  # every module of the package was imported
    assert "torch" in result["top"]
    assert {"sklearn", "matplotlib", "mnist1d", "softmask_bench"} & set(result["top"]) == set()


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
