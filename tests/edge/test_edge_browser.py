"""The JS learner (export/js) in headless Chromium equals the Python EdgeLearner.

Same artifacts, same batches: masked SGD steps (weights <= 5e-5: wasm and native sum in other orders), the importance pass and
update graph (<= 1e-5), eval logits; the checkpoint the browser saves loads in Python
(EdgeLearner, read_device_checkpoint, load_device_checkpoint into SoftMaskModel).
Needs chromium and `npm ci` in export/js (.ci/run installs both); fails without them.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from browser_helpers import (
    JS_DIR,
    browser_requirements,
    page_batches,
    run_page,
    serve,
    site,
    write_case,
)
from edge_helpers import (
    IN_FEATURES,
    batches,
    export_before_format_4,
    export_copy,
    max_diff,
    mlp_model_after_two_tasks,
    numpy_batches,
    tiny_bert_after_one_task,
    torch_weights,
    train_torch,
)
from softmask_edge import EarlyStopping, EdgeLearner, read_device_checkpoint
from softmask_edge.manifest import sha256
from torch import nn

from softmask_peft import SoftMaskConfig, SoftMaskModel, get_softmask_model
from softmask_peft.device import load_device_checkpoint

FIXTURE_V010 = Path(__file__).parents[1] / "fixtures" / "v0_1_0" / "edge_mlp"
EPOCHS, LR = 3, 0.1
ES = {"epochs": 12, "lr": 3.0, "options": {"patience": 3, "lrPatience": 1, "lrFactor": 0.5}}


def _arrays(flat: dict[str, list[float]], shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32).reshape(shapes[k]) for k, v in flat.items()}


def _shared_head_after_two_tasks() -> SoftMaskModel:
    """One head for every task (domain-incremental): its gradient is scaled by 1 − ā."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(IN_FEATURES, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2)
    )
    model = get_softmask_model(net, SoftMaskConfig(head_modules=["4"]))
    for t in range(2):
        train_torch(model, t, batches(t), classes=None)
    return model


@pytest.fixture(params=["float32", "float16", "uint8", "shared_head"])
def case(request, mlp_case, tmp_path):
    """(model, artifacts, importance tolerance) for each storage dtype of the importance, and
    a shared-head model (the graph reads ā)."""
    if request.param == "float32":
        return (*mlp_case, 1e-5)
    if request.param == "shared_head":
        model = _shared_head_after_two_tasks()
        artifacts = export_copy(model, tmp_path / "shared")
        assert EdgeLearner(artifacts).manifest.heads_scaled
        return model, artifacts, 1e-5
    dtype = request.param
    model = mlp_model_after_two_tasks(importance_dtype=dtype)
    # a rounding flip of the stored value (wasm vs native float) moves A by one step:
    # one uint8 code, or one float16 ulp (2^-11 below 1)
    step = 1 / 255 if dtype == "uint8" else 2**-11
    return model, export_copy(model, tmp_path / dtype), step + 1e-6


def test_browser_learner_matches_python_learner(case, tmp_path):
    browser_requirements()
    model, artifacts, tolerance = case
    data = numpy_batches(batches(2))
    root = site(tmp_path / "site")
    val = numpy_batches(batches(12, n=2))
    write_case(
        root / "case", artifacts, data, epochs=EPOCHS, lr=LR, validation=page_batches(val), es=ES
    )
    saved = tmp_path / "saved"
    with serve(root) as base:
        result = run_page(f"{base}/js/test/learn.html?case=/case/", saved)

    # onnxruntime logs nothing per step (a console line per optimizer step cost ~1.5 ms)
    assert not [line for line in result["console"] if "onnxruntime" in line]

    python = EdgeLearner(artifacts)
    shapes = python.manifest.params
    losses = python.learn_task(data, epochs=EPOCHS, lr=LR)
    # wasm SIMD and native kernels sum in other orders: per-epoch losses drift apart by ~2e-5
    # relative over 6 epochs and weights by ~1.2e-5 (measured with this release's importance)
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-4)
    assert max_diff(python.parameters(), _arrays(result["weights"], shapes)) <= 5e-5
    python_task = python.end_task(data)
    assert max_diff(python_task, _arrays(result["taskImportance"], shapes)) <= tolerance
    assert max_diff(python.importance(), _arrays(result["importance"], shapes)) <= tolerance
    logits = python.predict(data[0][0], task_id=2)
    np.testing.assert_allclose(
        np.asarray(result["logits"]).reshape(logits.shape), logits, atol=1e-5
    )

    # early stopping: same validation curve (lr decays, stop) and the same kept weights
    es = EdgeLearner(artifacts)
    options = EarlyStopping(patience=3, lr_patience=1, lr_factor=0.5)
    es.learn_task(data, epochs=ES["epochs"], lr=ES["lr"], validation=val, early_stopping=options)
    assert len(es.validation_losses) < ES["epochs"]
    np.testing.assert_allclose(result["esValidationLosses"], es.validation_losses, rtol=1e-4)
    assert max_diff(es.parameters(), _arrays(result["esWeights"], shapes)) <= 5e-5

    # the browser's save is a checkpoint generation Python reads back
    for name in (
        "training_model.onnx",
        "eval_model.onnx",
        "optimizer_model.onnx",
        "importance_update.onnx",
    ):
        shutil.copy(artifacts / name, saved / name)
    (saved / "result.json").unlink()
    reloaded = EdgeLearner(saved)
    assert reloaded.num_tasks == 3 and reloaded.manifest.generation == 1
    assert reloaded.manifest.task_names[-1] == "browser_task"
    assert max_diff(reloaded.parameters(), python.parameters()) <= 5e-5
    assert max_diff(reloaded.task_importance(2), python_task) <= tolerance
    back = read_device_checkpoint(saved)
    assert max_diff(back.importance, python.importance()) <= tolerance
    load_device_checkpoint(model, saved)
    assert max_diff(torch_weights(model), reloaded.parameters()) == 0.0
    assert max_diff({k: v.numpy() for k, v in model.importance.items()}, back.importance) == 0.0
    assert model.num_tasks == 3


NODE_LOAD = """
import { readFile } from 'node:fs/promises';
import { EdgeLearner } from './softmask_edge.mjs';
const dir = process.argv[1];
try {
  await EdgeLearner.load({ read: async (n) => new Uint8Array(await readFile(`${dir}/${n}`)) }, null);
  console.log('loaded');
} catch (e) {
  console.log(`${e.constructor.name}: ${e.message}`);
}
"""


def _node(script: str, *args: str, timeout: float = 60) -> str:
    """Run an ES module script with node in export/js; its stdout."""
    _, node = browser_requirements()
    proc = subprocess.run(
        [node, "--input-type=module", "-e", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=JS_DIR,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def _js_load(directory) -> str:
    return _node(NODE_LOAD, str(directory))


def test_js_learner_checks_the_manifest_and_hashes(mlp_case, tmp_path):
    """Format 1 artifacts (0.1.0), another export's graph and a damaged checkpoint are refused
    before ORT sees them; format 2 (no graph hashes) still loads."""
    model, artifacts = mlp_case
    assert "format_version 1 is not supported" in _js_load(FIXTURE_V010)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    format_2 = tmp_path / "format_2"
    shutil.copytree(artifacts, format_2)
    old = {k: v for k, v in manifest.items() if k not in ("export_id", "graphs_sha256")}
    (format_2 / "manifest.json").write_text(json.dumps({**old, "format_version": 2}))
    assert _js_load(format_2) == "loaded"
    other = export_copy(model, tmp_path / "other")
    mixed = tmp_path / "mixed"
    shutil.copytree(artifacts, mixed)
    shutil.copy(other / "eval_model.onnx", mixed / "eval_model.onnx")
    assert _js_load(mixed) == (
        "CorruptArtifactError: eval_model.onnx is damaged or belongs to another export: its SHA-256 "
        "differs from the manifest"
    )
    checkpoint = artifacts / manifest["checkpoint"]
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    assert _js_load(artifacts) == (
        f"CorruptArtifactError: {manifest['checkpoint']} is damaged or belongs to another export: its "
        "SHA-256 differs from the manifest"
    )


NODE_GUESSES = """
import { readFile } from 'node:fs/promises';
import { guessedBroadcasts, wrongBroadcasts } from './broadcasts.mjs';
import { EdgeLearner } from './softmask_edge.mjs';
const ort = await import('./node_modules/onnxruntime-web/dist/ort.training.wasm.min.mjs');
ort.env.wasm.numThreads = 1;
const out = {};
for (const dir of process.argv.slice(1)) {
  const bytes = async (n) => new Uint8Array(await readFile(`${dir}/${n}`));
  const guessed = guessedBroadcasts(await bytes('training_model.onnx'));
  const wrong = await wrongBroadcasts(ort, await bytes('eval_model.onnx'), guessed);
  let load = 'loaded';
  try { await EdgeLearner.load({ read: bytes }, ort); } catch (e) { load = { name: e.name, code: e.code, message: e.message }; }
  out[dir] = { guessed: guessed.map((g) => g.node), wrong, load };
}
console.log(JSON.stringify(out));
"""


@pytest.mark.onnx_runtime
def test_js_learner_refuses_artifacts_built_on_wrong_broadcast_guesses(monkeypatch, tmp_path):
    """Exported the old way (before format 4): a tiny BERT is refused with the Python learner's
    error kind, code and advice; a tiny RoBERTa (guesses all right) and an MLP (none) load. The
    JS rule finds the same guessed and wrong nodes as the Python one."""
    import onnx  # not at the top: this module also runs on Python 3.13, which has no onnx
    from softmask_edge.session_graphs import guessed_broadcasts, wrong_broadcasts

    old_export = functools.partial(export_before_format_4, monkeypatch)
    _, _, bert = tiny_bert_after_one_task(tmp_path / "bert", exporter=old_export)
    _, _, roberta = tiny_bert_after_one_task(tmp_path / "roberta", old_export, roberta=True)
    mlp = old_export(mlp_model_after_two_tasks(), tmp_path / "mlp")
    js = json.loads(_node(NODE_GUESSES, str(bert), str(roberta), str(mlp), timeout=120))
    refused = js[str(bert)]["load"]
    assert (refused["name"], refused["code"]) == ("UnsupportedFormatError", "unsupported_format")
    assert refused["message"].startswith("device format 3 artifacts whose gradient graph")
    assert "export the model again with this release" in refused["message"]
    assert js[str(roberta)]["load"] == js[str(mlp)]["load"] == "loaded"
    for folder in (bert, roberta, mlp):
        guessed = guessed_broadcasts(onnx.load(folder / "training_model.onnx"))
        wrong = wrong_broadcasts(onnx.load(folder / "eval_model.onnx"), guessed)
        assert js[str(folder)]["guessed"] == [g.node for g in guessed]
        assert js[str(folder)]["wrong"] == wrong
    assert js[str(bert)]["wrong"] == ["/net/bert/embeddings/Add_1"] and js[str(roberta)]["guessed"]


@pytest.mark.onnx_runtime
@pytest.mark.slow
def test_browser_demo_page_learns_the_last_task(tmp_path):
    """The demo page's 'before' row, computed in the browser, is PyTorch's last row; it plots
    a loss per epoch, predicts the drawing pad's digit with every head, and a screenshot of it
    is written."""
    from softmask_bench.browser_demo import run_browser_demo
    from softmask_bench.training import TrainConfig

    browser_requirements()
    shot = tmp_path / "demo.png"
    result = run_browser_demo(4, train_config=TrainConfig(epochs=2, batch_size=64), screenshot=shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert [p["epoch"] for p in result["progress"]] == list(range(len(result["progress"])))
    assert [d["task"] for d in result["drawn"]] == [0, 1, 2, 3, 4]
    assert all(2 * d["task"] <= d["digit"] <= 2 * d["task"] + 1 for d in result["drawn"])
    rows = result["rows"]
    assert len(rows) == 5 and all(len(row) == 5 for row in rows)
    np.testing.assert_allclose(result["before"][:4], rows[3][:4], atol=1e-9)
    assert result["before"][4] is None and rows[4][4] is not None
    assert all(0.0 <= v <= 100.0 for v in rows[4])
    assert rows[4][4] > 60.0  # two-class task learned in the page (chance is 50)


def test_bare_number_rejection_restarts_the_worker(mlp_case, tmp_path):
    """onnxruntime-web throws a bare number for an SGD flag output of rank 1 (format 1's
    declaration): the client reports it as fatal, starts a new worker and reloads."""
    import onnx

    browser_requirements()
    _, artifacts = mlp_case
    optimizer = onnx.load(artifacts / "optimizer_model.onnx")
    flag = optimizer.graph.output[0]
    flag.type.tensor_type.shape.dim.add().dim_value = 1
    onnx.save(optimizer, artifacts / "optimizer_model.onnx")
    manifest = json.loads((artifacts / "manifest.json").read_text())
    manifest["graphs_sha256"]["optimizer_model.onnx"] = sha256(artifacts / "optimizer_model.onnx")
    (artifacts / "manifest.json").write_text(json.dumps(manifest))
    root = site(tmp_path / "site")
    write_case(root / "case", artifacts, numpy_batches(batches(2, n=1)), epochs=1, lr=LR)
    with serve(root) as base:
        result = run_page(f"{base}/js/test/fatal.html?case=/case/", tmp_path / "out")
    assert result["rejected"] == "fatal", result
    assert "bare code" in result["message"] and result["restarts"] == 1
    shapes = EdgeLearner(artifacts).manifest.params
    assert max_diff(EdgeLearner(artifacts).parameters(), _arrays(result["weights"], shapes)) == 0.0


def test_js_learner_checks_importance_like_the_python_learner(mlp_case, tmp_path):
    """NaN or 1.5 in the history, or another storage dtype: refused by both learners."""
    from edge_helpers import rehash
    from softmask_edge import ArtifactMismatchError
    from softmask_edge.storage import write_history

    _, artifacts = mlp_case
    manifest = json.loads((artifacts / "manifest.json").read_text())
    with np.load(artifacts / manifest["history"]) as data:
        history = {k: data[k] for k in data.files}
    key = sorted(history)[0]
    for value, dtype, problem in (
        (np.nan, np.float32, "importance outside [0, 1] or not finite"),
        (1.5, np.float32, "importance outside [0, 1] or not finite"),
        (0.5, np.uint8, "Uint8Array, the manifest's importance dtype stores float32"),
    ):
        case = tmp_path / f"case_{len(list(tmp_path.iterdir()))}"
        shutil.copytree(artifacts, case)
        bad = history[key].astype(dtype)
        bad.flat[0] = value
        write_history(case / manifest["history"], {**history, key: bad})
        rehash(case)
        assert _js_load(case) == f"ArtifactMismatchError: {key}: {problem}"
        with pytest.raises(ArtifactMismatchError, match=key):
            EdgeLearner(case)
    assert _js_load(artifacts) == "loaded"


def test_js_protobuf_reader_refuses_a_cut_off_message():
    """A graph cut inside a varint is an error, not an endless loop in the worker."""
    script = """
import { specializeGraph } from './formats.mjs';
for (const bytes of [[0x08, 0x07, 0x80], [0x3a, 0x05, 0x0a]]) {
  try { specializeGraph(Uint8Array.from(bytes)); console.log('parsed'); }
  catch (e) { console.log(e.message); }
}
"""
    assert _node(script).splitlines() == [
        "truncated or overlong protobuf varint",
        "truncated protobuf message",
    ]


NODE_IDS = """
import { readFile } from 'node:fs/promises';
import { EdgeLearner } from './softmask_edge.mjs';
const ort = await import('./node_modules/onnxruntime-web/dist/ort.training.wasm.min.mjs');
ort.env.wasm.numThreads = 1;
const dir = process.argv[1];
const learner = await EdgeLearner.load({ read: async (n) => new Uint8Array(await readFile(`${dir}/${n}`)) }, ort);
const batch = (id) => ({
  inputs: {
    input_ids: { data: BigInt64Array.from([1n, 2n, id, 3n]), dims: [1, 4] },
    attention_mask: { data: new BigInt64Array(4).fill(1n), dims: [1, 4] },
  },
  labels: [0],
});
for (const id of [40n, -1n, 39n]) {
  const before = learner.parameters()['classifier.weight'].join();
  try { await learner.learnTask([batch(0n), batch(id)], { epochs: 1, lr: 0.1 }); console.log(`learned ${id}`); }
  catch (e) { console.log(`${e.message}; unchanged: ${learner.parameters()['classifier.weight'].join() === before}`); }
}
await learner.release();
"""


@pytest.mark.onnx_runtime
def test_js_learner_refuses_token_ids_outside_the_embedding(tmp_path):
    """As the Python learner: the rows of the table each integer input indexes are read from
    the training graph, and a batch with an id outside them fails before the first step."""
    _, _, artifacts = tiny_bert_after_one_task(tmp_path / "bert")  # vocab 40
    refused = "input input_ids holds ids outside [0, 40): the table it indexes has 40 rows"
    lines = _node(NODE_IDS, str(artifacts), timeout=120).splitlines()
    assert lines == [f"{refused}; unchanged: true"] * 2 + ["learned 39"]


NODE_BATCHES = """
import { readFile } from 'node:fs/promises';
import { EdgeLearner } from './softmask_edge.mjs';
const ort = await import('./node_modules/onnxruntime-web/dist/ort.training.wasm.min.mjs');
ort.env.wasm.numThreads = 1;
const [mlp, bert] = process.argv.slice(1);
const load = (dir) => EdgeLearner.load({ read: async (n) => new Uint8Array(await readFile(`${dir}/${n}`)) }, ort);
const weights = (learner) => JSON.stringify(Object.values(learner.parameters()).map((w) => Array.from(w)));
const attempt = async (learner, batches, options = { epochs: 1, lr: 0.1 }) => {
  const before = weights(learner);
  try { await learner.learnTask(batches, options); return 'learned'; }
  catch (e) { return `${typeof e === 'number' ? 'bare number' : e.message}; unchanged: ${weights(learner) === before}`; }
};
const x = (rows, cols = 6, Type = Float32Array) => ({ data: new Type(rows * cols).fill(0.5), dims: [rows, cols] });
const good = { inputs: { input: x(4) }, labels: [0, 1, 0, 1] };
const m = await load(mlp);
for (const [batches, options] of [
  [[good, { inputs: { input: x(4, 7) }, labels: [0, 1, 0, 1] }]],
  [[good, { inputs: { input: { data: new Float32Array(10), dims: [4, 6] } }, labels: [0, 1, 0, 1] }]],
  [[good, { inputs: { input: x(4, 6, Float64Array) }, labels: [0, 1, 0, 1] }]],
  [[good, { inputs: { input: x(4) }, labels: [0, 1, 0] }]],
  [[good, { inputs: { input: x(0) }, labels: [] }]],
  [[good], { epochs: 1.5, lr: 0.1 }],
]) console.log(await attempt(m, batches, options));
const b = await load(bert);
const ids = (n) => ({ data: new BigInt64Array(n).fill(1n), dims: [1, n] });
const text = (n) => ({ inputs: { input_ids: ids(n), attention_mask: ids(n) }, labels: [2] });
console.log(await attempt(b, [text(6), text(20)]));  // longer than the 16 positions
// the validation pass fails after an epoch's weights were read back into the learner
console.log(await attempt(b, [text(6)], { epochs: 2, lr: 0.1, validation: [text(20)] }));
"""


def test_js_learner_checks_batches_first_and_restores_weights_after_a_failed_pass(
    mlp_case, tmp_path
):
    """Shapes, data lengths, array types, label counts, empty batches and epochs are refused
    before the first step (onnxruntime-web would fail with a bare number or a wasm trap); a
    batch onnxruntime refuses mid-pass leaves the weights where the call started."""
    _, artifacts = mlp_case
    _, _, bert = tiny_bert_after_one_task(tmp_path / "bert")  # 16 positions
    lines = _node(NODE_BATCHES, str(artifacts), str(bert), timeout=120).splitlines()
    assert lines == [
        "input input: dims [4,7] do not match [?,6]; unchanged: true",
        "input input: 10 values for dims [4,6]; unchanged: true",
        "input input: Float64Array data, the graph needs Float32Array (float32); unchanged: true",
        "3 labels for a batch of 4 rows; unchanged: true",
        "a batch needs at least one row, got 0; unchanged: true",
        "epochs must be an integer >= 1 and lr a finite number > 0, got epochs=1.5, lr=0.1;"
        " unchanged: true",
        "bare number; unchanged: true",
        "bare number; unchanged: true",
    ]


@pytest.mark.onnx_runtime
def test_browser_trains_a_padded_transformer_at_batch_4(tmp_path):
    """A tiny BERT, batches of 4 with padded rows, learned in Chromium == the Python learner.

    Before measured shapes (softmask_edge.shapes) the position table's gradient was built for
    [1, seq, H] and fed [batch, seq, H]: onnxruntime-web's heap was overwritten and the step
    hung or trapped ("memory access out of bounds") at any batch >= 2."""
    browser_requirements()
    _, data, artifacts = tiny_bert_after_one_task(tmp_path / "bert")
    device = [{k: v.numpy() for k, v in b.items()} for b in data]
    assert all(len(b["labels"]) == 4 for b in device)
    assert all((b["attention_mask"] == 0).any() for b in device)  # padded rows
    root = site(tmp_path / "site")
    write_case(root / "case", artifacts, device, epochs=2, lr=LR)
    with serve(root) as base:
        result = run_page(f"{base}/js/test/learn.html?case=/case/", tmp_path / "saved", 120)
    python = EdgeLearner(artifacts)
    shapes = python.manifest.params
    np.testing.assert_allclose(
        result["losses"], python.learn_task(device, epochs=2, lr=LR), rtol=1e-4
    )
    assert max_diff(python.parameters(), _arrays(result["weights"], shapes)) <= 1e-4
    task = python.end_task(device)
    browser = _arrays(result["taskImportance"], shapes)
    # key biases: gradient 0 up to rounding (softmax is shift-invariant), importance is noise
    noisy = {n for n in task if n.endswith("attention.self.key.bias")}
    assert max_diff(*({n: v[n] for n in v if n not in noisy} for v in (task, browser))) <= 0.02
