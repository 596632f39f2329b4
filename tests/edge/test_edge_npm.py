"""The npm package: versioned with the Python package, packed with `npm pack`, installed from
the tarball into an empty project (offline, from npm's cache), patched, and learning in node."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from browser_helpers import JS_DIR, browser_requirements
from edge_helpers import read_manifest
from softmask_format.version import __version__

LEARN = """
import { readFile } from 'node:fs/promises';
import { EdgeLearner, CONTRACT, BatchError, WorkerLearner } from 'softmask-edge';
const ort = await import('./node_modules/onnxruntime-web/dist/ort.training.wasm.min.mjs');
ort.env.wasm.numThreads = 1;
const dir = process.argv[1];
const learner = await EdgeLearner.load({ read: async (n) => new Uint8Array(await readFile(`${dir}/${n}`)) }, ort);
const batch = { inputs: { input: { data: new Float32Array(24).fill(0.5), dims: [4, 6] } }, labels: [0, 1, 0, 1] };
const losses = await learner.learnTask([batch], { epochs: 2, lr: 0.1 });
let refused = '';
try { await learner.learnTask([{ inputs: {}, labels: [] }]); } catch (e) { refused = e instanceof BatchError ? e.code : String(e); }
console.log(JSON.stringify({ losses, refused, version: CONTRACT.format_version, client: typeof WorkerLearner }));
"""


def _npm(*args: str, cwd: Path, timeout: float = 300) -> str:
    proc = subprocess.run(
        ["npm", *args, "--no-audit", "--no-fund"],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _consumer(project: Path, tarball: Path) -> None:
    """A page project depending on the tarball; its lock file pins onnxruntime-web and its
    dependencies as export/js's does, so `npm ci --offline` installs from npm's cache."""
    source = json.loads((JS_DIR / "package-lock.json").read_text())["packages"]
    spec = f"file:{tarball}"
    package = {
        "name": "page",
        "private": True,
        "type": "module",
        "dependencies": {"softmask-edge": spec},
    }
    packages = {
        "": {"name": "page", "dependencies": {"softmask-edge": spec}},
        "node_modules/softmask-edge": {
            "version": source[""]["version"],
            "resolved": spec,
            "hasInstallScript": True,
            "license": "Apache-2.0",
            "dependencies": source[""]["dependencies"],
        },
        **{k: v for k, v in source.items() if k and not v.get("dev")},
    }
    lock = {"name": "page", "lockfileVersion": 3, "requires": True, "packages": packages}
    (project / "package.json").write_text(json.dumps(package))
    (project / "package-lock.json").write_text(json.dumps(lock))


def test_npm_version_is_the_python_version():
    package = json.loads((JS_DIR / "package.json").read_text())
    assert package["version"] == __version__


def test_the_packed_tarball_installs_patches_and_learns(mlp_case, tmp_path):
    _, node = browser_requirements()
    _, artifacts = mlp_case
    tarball = _npm("pack", "--pack-destination", str(tmp_path), cwd=JS_DIR).strip().splitlines()[-1]
    project = tmp_path / "project"
    project.mkdir()
    _consumer(project, tmp_path / tarball)
    _npm("ci", "--offline", cwd=project)
    installed = project / "node_modules" / "softmask-edge"
    assert (installed / "index.d.ts").is_file() and (installed / "README.md").is_file()
    assert not (installed / "test").exists() and not (installed / "node_modules").exists()
    bundle = project / "node_modules" / "onnxruntime-web" / "dist" / "ort.training.wasm.min.mjs"
    assert "n._free(u),n._free(l)" not in bundle.read_text()  # the postinstall patch ran
    proc = subprocess.run(
        [node, "--input-type=module", "-e", LEARN, str(artifacts)],
        cwd=project, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert len(out["losses"]) == 2 and out["losses"][1] < out["losses"][0]
    assert out["refused"] == "batch_error" and out["client"] == "function"
    assert out["version"] == read_manifest(artifacts)["format_version"]
