"""The browser client API (export/js/client.mjs) in headless Chromium, pages from 127.0.0.1:
typed errors, the call queue, progress, cancel, the watchdog, a broken worker URL, terminate,
restore from IndexedDB and OPFS, two writers on one store, a page-relative URL.

Needs chromium and `npm ci` in export/js (.ci/run installs both); fails without them."""

from __future__ import annotations

from browser_helpers import browser_requirements, run_page, serve, site, write_case
from edge_helpers import batches, numpy_batches

STORED = [
    "eval_model.onnx",
    "importance_update.onnx",
    "manifest.json",
    "optimizer_model.onnx",
    "training_model.onnx",
]


def test_client_api_promises(mlp_case, tmp_path):
    browser_requirements()
    _, artifacts = mlp_case
    root = site(tmp_path / "site")
    write_case(root / "case", artifacts, numpy_batches(batches(2)), epochs=2, lr=0.1)
    with serve(root) as base:
        r = run_page(f"{base}/js/test/client.html?case=/case/", tmp_path / "out", 180)

    # errors are rebuilt as their own class with the contract's code
    assert r["typed"]["name"] == "TaskOrderError" and r["typed"]["code"] == "task_order"
    assert "taskId 99 is not a declared head" in r["typed"]["message"]
    assert (r["batch"]["name"], r["batch"]["code"]) == ("BatchError", "batch_error")
    # learnTask, endTask and save called without awaiting run in order: same result as awaited
    assert r["queueImportanceDiff"] == 0 and r["queueWeightsDiff"] == 0
    assert r["queuedGeneration"] == 1
    # progress: one event and one callback per epoch, with the loss, lr and time
    assert r["progress"]["events"] == 3 and r["progress"]["callbacks"] == 3
    first = r["progress"]["first"]
    assert first["epoch"] == 0 and first["epochs"] == 3 and first["lr"] == 0.1
    assert first["loss"] > 0 and first["ms"] > 0 and first["valLoss"] is None
    # AbortSignal: AbortError, the weights back where the call started
    assert r["cancel"]["name"] == "AbortError" and r["cancel"]["code"] == "aborted"
    assert r["cancelWeightsDiff"] == 0
    # watchdog: TimeoutError, the worker restarted and reloaded (the weights as loaded)
    assert r["timeout"]["name"] == "TimeoutError" and r["restarts"] == 1
    assert r["afterTimeout"] == 0
    # a worker that cannot load, a terminated learner: rejected, never pending
    assert r["badWorker"]["name"] == "FatalRuntimeError"
    assert "no-such-worker.mjs" in r["badWorker"]["message"]
    assert [t["name"] for t in r["terminated"]] == ["TerminatedError"] * 2
    # restore: what a learner saved into IndexedDB / OPFS loads in another learner
    for store in ("indexedDB", "opfs"):
        s = r[store]
        assert s["generation"] == 1 and s["tasks"] == r["tasksBefore"] + 1
        assert s["weightsDiff"] == 0
        assert s["files"] == sorted([*STORED, "checkpoint-000001", "importance_history-000001.npz"])
    # two writers on one store: the second is refused, the first's generation stays whole,
    # the old generation's files are gone
    assert r["firstWriter"] == 2
    assert r["secondWriter"]["name"] == "StaleWriterError"
    assert r["afterTwoWriters"] == {"generation": 2, "weightsDiff": 0}
    assert r["filesAfterTwoWriters"] == sorted(
        [*STORED, "checkpoint-000002", "importance_history-000002.npz"]
    )
    # another document (an iframe, as another tab) saves at the same moment: one generation 3
    # lands, the other writer gets StaleWriterError
    c = r["concurrent"]
    assert c["theirLoaded"] == 2 and c["stored"] == 3
    outcomes = sorted(
        [
            c["mine"].get("saved", c["mine"].get("name")),
            c["theirs"].get("saved", c["theirs"].get("name")),
        ],
        key=str,
    )
    assert outcomes == [3, "StaleWriterError"]
    # a URL relative to the page (not to the worker)
    assert r["relative"] == r["tasksBefore"]
