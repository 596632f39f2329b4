"""The browser client API (export/js/client.mjs) in headless Chromium, pages from 127.0.0.1:
typed errors, the call queue, progress, cancel, the watchdog, a broken worker URL, terminate,
restore from IndexedDB and OPFS, a page-relative URL; and two tabs (two pages of one browser
context) on one stored state.

Needs chromium and `npm ci` in export/js (.ci/run installs both); fails without them."""

from __future__ import annotations

import functools

import pytest
from browser_helpers import browser_requirements, run_page, serve, site, write_case
from edge_helpers import batches, export_before_format_4, numpy_batches, tiny_bert_after_one_task

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
    # a URL relative to the page (not to the worker)
    assert r["relative"] == r["tasksBefore"]


def _generation_files(generation: int) -> list[str]:
    return sorted(
        [*STORED, f"checkpoint-{generation:06d}", f"importance_history-{generation:06d}.npz"]
    )


STALE = {"name": "StaleWriterError", "code": "stale_writer"}


@pytest.mark.parametrize(
    "stores, rounds",
    [("indexedDB", 1), pytest.param("indexedDB,opfs", 6, marks=pytest.mark.slow)],
)
def test_two_tabs_on_one_stored_state(mlp_case, monkeypatch, tmp_path, stores, rounds):
    """Two pages of one browser context (same origin: shared IndexedDB, OPFS, Web Locks), as two
    tabs (export/js/test/run-tabs.mjs), on one store of each kind: both load generation 1; A
    saves, B's save is refused with StaleWriterError and the store still loads as A saved it;
    B reloads and sees A's generation; `rounds` times both save at the same moment: one
    generation lands, the other tab is refused, reloads and loads it whole. The slow run (both
    stores, more rounds) also has tab A load a transformer exported before format 4: refused
    with UnsupportedFormatError."""
    browser_requirements()
    _, artifacts = mlp_case
    root = site(tmp_path / "site")
    write_case(root / "case", artifacts, numpy_batches(batches(2)), epochs=1, lr=0.1)
    query = f"case=/case/&stores={stores}&rounds={rounds}"
    if "opfs" in stores:
        old_export = functools.partial(export_before_format_4, monkeypatch)
        tiny_bert_after_one_task(root / "legacy", exporter=old_export)
        query += "&legacy=/legacy/"
    with serve(root) as base:
        r = run_page(
            f"{base}/js/test/tab.html?{query}", tmp_path / "out", 300, runner="run-tabs.mjs"
        )

    for kind in stores.split(","):
        t = r[kind]
        assert t["seeded"] == 1 and t["loaded"] == [1, 1] and t["startDiff"] == 0, kind
        # A saves generation 2; B, still on generation 1, is refused and writes nothing
        assert t["first"] == {"saved": 2} and t["second"] == STALE, kind
        assert t["files"] == _generation_files(2), kind
        # B reloads: a new document and learner load A's generation, weights as A saved them
        assert t["reloaded"] == 2 and t["reloadedDiff"] == 0, kind
        # saves at the same moment: exactly one lands each time, the store loads whole
        assert len(t["rounds"]) == rounds
        for i, step in enumerate(t["rounds"]):
            generation = 3 + i
            assert sorted(step["saves"], key=str) == [STALE, {"saved": generation}], (kind, i)
            assert step["loaded"] == generation and step["diff"] == 0, (kind, i)
            assert step["files"] == _generation_files(generation), (kind, i)
    if "opfs" in stores:
        legacy = r["indexedDB"]["legacy"]
        assert (legacy["name"], legacy["code"]) == ("UnsupportedFormatError", "unsupported_format")
        # measured in the worker: the one wrong guess of six, not every guess
        assert "(1 node(s), e.g. /net/bert/embeddings/Add_1)" in legacy["message"]
