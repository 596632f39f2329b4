"""One device contract: the JS learner's copy is generated from device_contract.json, and both
learners judge the same manifests alike; a fuzz test of every file the JS learner reads.

Needs node and `npm ci` in export/js (as the browser tests)."""

from __future__ import annotations

import json
import random
import shutil

from browser_helpers import JS_DIR, browser_requirements
from edge_helpers import read_manifest
from softmask_edge import EdgeError
from softmask_edge.manifest import STATIC_FILES
from softmask_format.contract import CONTRACT, js_module
from test_edge_browser import _node


def test_the_js_contract_is_generated_from_the_json():
    assert (JS_DIR / "contract.mjs").read_text() == js_module()
    script = "import { CONTRACT } from './contract.mjs'; console.log(JSON.stringify(CONTRACT));"
    assert json.loads(_node(script)) == CONTRACT


def test_js_errors_carry_the_contract_codes():
    script = """
import { ERROR_CLASSES, EdgeError, fromWire, toWire } from './errors.mjs';
const out = {};
for (const [name, Kind] of Object.entries(ERROR_CLASSES)) {
  const e = fromWire(toWire(new Kind('x')));
  out[name] = [e.code, e instanceof Kind, e instanceof EdgeError, e.name];
}
console.log(JSON.stringify(out));
"""
    result = json.loads(_node(script))
    assert set(result) == set(CONTRACT["errors"])
    for name, spec in CONTRACT["errors"].items():
        assert result[name] == [spec["code"], True, True, name]


def _edits(raw: dict, rng: random.Random) -> dict:
    """A manifest with one field replaced by a value of another type or range, or removed,
    or an unknown field added."""
    odd = [None, True, -1, 0, 1.5, 2**53, "x", "../x", "", [], ["a"], [1], {}, {"a": [1]},
           "0" * 64, "0" * 32, [None, 6], [2] * 20]  # fmt: skip
    out = dict(raw)
    key = rng.choice([*raw, "surprise"])
    if key in out and rng.random() < 0.15:
        del out[key]
    else:
        out[key] = rng.choice(odd)
    return out


def test_both_learners_judge_the_same_manifests_alike(mlp_case, tmp_path):
    """Each case: Python (Manifest.load) and JS (parseManifest + sizes) both accept it or both
    refuse it with their error naming the same field."""
    browser_requirements()
    _, artifacts = mlp_case
    raw = read_manifest(artifacts)
    rng = random.Random(0)
    cases = [_edits(raw, rng) for _ in range(150)]
    cases += [{**raw, "num_tasks": "1"}, {**raw, "generation": "../../x"}, {**raw, "masked": [7]}]
    python = []
    for case in cases:
        folder = tmp_path / "case"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(artifacts, folder)
        (folder / "manifest.json").write_text(json.dumps(case))
        try:
            from softmask_edge.manifest import Manifest

            Manifest.load(folder)
            python.append("ok")
        except EdgeError as e:
            python.append(type(e).__name__)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = """
import { readFileSync } from 'node:fs';
import { parseManifest, checkSizes } from './manifest.mjs';
const [cases, dir] = [JSON.parse(readFileSync(process.argv[1], 'utf8')), process.argv[2]];
const size = (n) => { try { return readFileSync(`${dir}/${n}`).length; } catch { return -1; } };
console.log(JSON.stringify(cases.map((c) => {
  try {
    const m = parseManifest(new TextEncoder().encode(JSON.stringify(c)));
    checkSizes(m, size(m.checkpoint), size(m.history));
    return 'ok';
  } catch (e) { return e.name; }
})));
"""
    js = json.loads(_node(script, str(tmp_path / "cases.json"), str(artifacts)))
    assert len(js) == len(python)
    disagree = [(c, p, j) for c, p, j in zip(cases, python, js) if (p == "ok") != (j == "ok")]
    assert not disagree, disagree[:3]
    assert python.count("ok") < len(cases) // 2 and "ok" in python  # the cases bite
    assert all(j == "ok" or j.endswith("Error") and j != "Error" for j in js)


FUZZ = """
import { readFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { EdgeLearner, EdgeError } from './softmask_edge.mjs';
const [dir, seed, count, rehash] = [process.argv[1], Number(process.argv[2]), Number(process.argv[3]), process.argv[4] === '1'];
const ort = await import('./node_modules/onnxruntime-web/dist/ort.training.wasm.min.mjs');
ort.env.wasm.numThreads = 1;
let s = seed;
const rand = () => { s = (s * 1103515245 + 12345) % 2147483648; return s / 2147483648; };
const names = JSON.parse(process.argv[5]);
const pristine = Object.fromEntries(names.map((n) => [n, new Uint8Array(readFileSync(`${dir}/${n}`))]));
const outcomes = {};
for (let i = 0; i < count; i++) {
  const files = { ...pristine };
  const name = names[Math.floor(rand() * names.length)];
  let bytes = Uint8Array.from(files[name]);
  const edits = 1 + Math.floor(rand() * 4);
  for (let k = 0; k < edits; k++) bytes[Math.floor(rand() * bytes.length)] = Math.floor(rand() * 256);
  if (rand() < 0.3) bytes = bytes.subarray(0, Math.floor(rand() * bytes.length));
  files[name] = bytes;
  if (rehash && name !== 'manifest.json') {
    const m = JSON.parse(new TextDecoder().decode(files['manifest.json']));
    const hex = createHash('sha256').update(bytes).digest('hex');
    if (name === m.checkpoint) m.checkpoint_sha256 = hex;
    else if (name === m.history) m.history_sha256 = hex;
    else m.graphs_sha256[name] = hex;
    files['manifest.json'] = new TextEncoder().encode(JSON.stringify(m));
  }
  let outcome;
  try {
    const learner = await EdgeLearner.load(files, ort);
    outcome = 'loaded';
    await learner.release();
  } catch (e) {
    outcome = e instanceof EdgeError ? e.name : `NOT AN EdgeError: ${typeof e === 'object' ? e?.name + ': ' + e?.message : e}`;
  }
  outcomes[outcome] = (outcomes[outcome] ?? 0) + 1;
}
console.log(JSON.stringify(outcomes));
"""


def test_every_file_the_js_learner_reads_fuzzed_loads_or_raises_an_edge_error(mlp_case):
    """Byte flips and cuts of the manifest, checkpoint, history and each graph; the second run
    rewrites the hashes, as someone editing files on purpose would, to reach every parser
    (checkpoint flatbuffer, .npz, protobuf). Every outcome is a load or an EdgeError subclass."""
    _, artifacts = mlp_case
    raw = read_manifest(artifacts)
    names = ["manifest.json", raw["checkpoint"], raw["history"], *STATIC_FILES]
    for seed, rehashed in ((1, "0"), (2, "1")):
        out = json.loads(
            _node(FUZZ, str(artifacts), str(seed), "60", rehashed, json.dumps(names), timeout=240)
        )
        assert sum(out.values()) == 60
        assert not [k for k in out if k.startswith("NOT")], out
        assert set(out) - {"loaded"}, out  # the mutations reach the checks


NULLS = """
import { readFile } from 'node:fs/promises';
import { EdgeLearner } from './softmask_edge.mjs';
const ort = await import('./node_modules/onnxruntime-web/dist/ort.training.wasm.min.mjs');
ort.env.wasm.numThreads = 1;
const dir = process.argv[1];
const learner = await EdgeLearner.load({ read: async (n) => new Uint8Array(await readFile(`${dir}/${n}`)) }, ort);
const calls = [
  () => learner.learnTask(null), () => learner.learnTask([null]), () => learner.learnTask([{}]),
  () => learner.endTask(undefined), () => learner.evaluate([]), () => learner.predict(null),
  () => learner.evaluate([{ inputs: {}, labels: [] }], { taskId: 99 }),
  () => learner.learnTask([{ inputs: null, labels: [0] }], { epochs: 0 }),
];
for (const call of calls) {
  try { await call(); console.log('no error'); } catch (e) { console.log(`${e.name} ${e.code}: ${e.message}`); }
}
"""


def test_js_null_and_empty_arguments_are_typed_errors(mlp_case):
    _, artifacts = mlp_case
    lines = _node(NULLS, str(artifacts)).splitlines()
    assert len(lines) == 8
    assert lines[0].startswith("BatchError batch_error: learnTask(2): batches must be an array")
    assert lines[1].startswith("BatchError batch_error: learnTask(2): batch 0 is null")
    assert lines[2] == "BatchError batch_error: batch inputs: missing input"
    assert lines[3].startswith("BatchError batch_error: the importance pass of task 2")
    assert lines[4] == "EmptyDataError empty_data: evaluate() got no batches"
    assert lines[5].startswith("BatchError batch_error:")
    assert lines[6].startswith("TaskOrderError task_order: taskId 99 is not a declared head")
    assert lines[7].startswith("BatchError") or lines[7].startswith("ArgumentError")
