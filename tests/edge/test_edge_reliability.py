"""Device-side reliability: nothing on disk is trusted blindly, nothing is lost, every failure is
a softmask_edge error that names the file and the problem."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from edge_helpers import (
    batches,
    device_script,
    export_copy,
    numpy_batches,
    read_manifest,
    rehash,
    write_manifest,
)
from onnx import numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
from softmask_edge import (
    ArgumentError,
    ArtifactMismatchError,
    BatchError,
    CorruptArtifactError,
    EdgeError,
    EdgeLearner,
    SaveLocationError,
    StaleWriterError,
    _ort,
    read_device_checkpoint,
)
from softmask_edge.manifest import MAX_MANIFEST_BYTES
from softmask_edge.storage import write_history

X, Y = numpy_batches(batches(2, n=1))[0]
GRAPHS = (
    "training_model.onnx",
    "eval_model.onnx",
    "optimizer_model.onnx",
    "importance_update.onnx",
)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _edit_checkpoint(artifacts: Path, name: str, value: np.ndarray) -> None:
    """Rewrite the checkpoint with onnxruntime itself, one tensor replaced, then rehash."""
    raw = read_manifest(artifacts)
    state = _ort.load_checkpoint(artifacts / raw["checkpoint"])
    tensors = {n: _ort.get_parameter(state, n).copy() for n in _ort.parameter_names(state)}
    tensors[name] = value
    trainable = [n for n in tensors if n in raw["params"]]
    frozen = [n for n in tensors if n not in raw["params"]]
    _ort.write_checkpoint(
        [numpy_helper.from_array(tensors[n], n).SerializeToString() for n in trainable],
        [numpy_helper.from_array(tensors[n], n).SerializeToString() for n in frozen],
        artifacts / raw["checkpoint"],
    )
    rehash(artifacts)


def _loaders(artifacts: Path):
    return (lambda: EdgeLearner(artifacts), lambda: read_device_checkpoint(artifacts))


# 1. importance values and dtypes --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [(np.nan, "NaN or Inf importance"), (1.5, r"outside \[0, 1\]"), (-1.0, r"outside \[0, 1\]")],
)
def test_checkpoint_importance_outside_0_1_is_refused(mlp_case, value, problem):
    _, artifacts = mlp_case
    name = read_manifest(artifacts)["masked"][0] + ".softmask_importance"
    state = _ort.load_checkpoint(artifacts / "checkpoint-000000")
    bad = _ort.get_parameter(state, name).copy()  # a view into `state`: copy before it goes
    bad.flat[0] = value
    _edit_checkpoint(artifacts, name, bad)
    before = _snapshot(artifacts)
    for load in _loaders(artifacts):
        with pytest.raises(ArtifactMismatchError, match=rf"{name}: .*{problem}"):
            load()
    assert _snapshot(artifacts) == before


@pytest.mark.parametrize(
    ("dtype", "error", "message"),
    [
        (np.float64, ArtifactMismatchError, "{name}: float64"),
        (np.uint8, ArtifactMismatchError, "{name}: uint8"),
        (np.int32, ArtifactMismatchError, "{name}: int32"),
        # onnxruntime 1.19 cannot read float16 checkpoint tensors at all
        (np.float16, CorruptArtifactError, "cannot read checkpoint .*Unsupported data type"),
    ],
)
def test_checkpoint_importance_of_another_dtype_is_refused(mlp_case, dtype, error, message):
    _, artifacts = mlp_case
    name = read_manifest(artifacts)["masked"][0] + ".softmask_importance"
    state = _ort.load_checkpoint(artifacts / "checkpoint-000000")
    _edit_checkpoint(artifacts, name, _ort.get_parameter(state, name).astype(dtype))
    for load in _loaders(artifacts):
        with pytest.raises(error, match=message.format(name=name)):
            load()


def test_mean_importance_outside_0_1_is_refused(mlp_case):
    _, artifacts = mlp_case
    _edit_checkpoint(artifacts, "softmask.mean_importance", np.array([2.0], np.float32))
    with pytest.raises(
        ArtifactMismatchError, match=r"softmask.mean_importance: importance outside"
    ):
        EdgeLearner(artifacts)


@pytest.mark.parametrize(
    ("value", "dtype", "problem"),
    [
        (np.nan, np.float32, "NaN or Inf importance"),
        (np.inf, np.float32, "NaN or Inf importance"),
        (1.5, np.float32, r"outside \[0, 1\]"),
        (-1.0, np.float32, r"outside \[0, 1\]"),
        (0.5, np.float64, "dtype float64"),
        (0, np.int32, "dtype int32"),
    ],
)
def test_history_importance_range_and_dtype_are_checked(mlp_case, value, dtype, problem):
    _, artifacts = mlp_case
    raw = read_manifest(artifacts)
    with np.load(artifacts / raw["history"]) as data:
        history = {k: data[k] for k in data.files}
    key = sorted(history)[0]
    bad = history[key].astype(dtype)
    bad.flat[0] = value
    write_history(artifacts / raw["history"], {**history, key: bad})
    rehash(artifacts)
    before = _snapshot(artifacts)
    for load in _loaders(artifacts):
        with pytest.raises(ArtifactMismatchError, match=rf"{key}: .*{problem}"):
            load()
    assert _snapshot(artifacts) == before


def test_compressed_history_is_refused(mlp_case):
    """np.savez_compressed members could inflate far beyond the file's bytes."""
    _, artifacts = mlp_case
    raw = read_manifest(artifacts)
    with np.load(artifacts / raw["history"]) as data:
        history = {k: data[k] for k in data.files}
    np.savez_compressed(artifacts / raw["history"], **history)
    rehash(artifacts)
    with pytest.raises(CorruptArtifactError, match="compressed members"):
        EdgeLearner(artifacts)


# 2. names, hashes, exports ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["../checkpoint-000000", "/etc/passwd", "sub/checkpoint-000000"])
def test_manifest_names_outside_the_folder_are_refused(mlp_case, name):
    _, artifacts = mlp_case
    raw = read_manifest(artifacts)
    write_manifest(artifacts, {**raw, "checkpoint": name})
    with pytest.raises(CorruptArtifactError, match="only plain file names"):
        EdgeLearner(artifacts)


def test_a_linked_file_is_refused_even_with_the_right_hash(mlp_case, tmp_path):
    _, artifacts = mlp_case
    outside = tmp_path / "outside"
    shutil.move(artifacts / "checkpoint-000000", outside)
    (artifacts / "checkpoint-000000").symlink_to(outside)
    with pytest.raises(CorruptArtifactError, match="not a regular file"):
        EdgeLearner(artifacts)


def test_every_graph_is_hashed_and_stamped_with_the_export_id(mlp_case):
    _, artifacts = mlp_case
    raw = read_manifest(artifacts)
    assert raw["format_version"] == 4 and sorted(raw["graphs_sha256"]) == sorted(GRAPHS)
    for name in GRAPHS:
        props = {p.key: p.value for p in onnx.load(artifacts / name).metadata_props}
        assert props["softmask.export_id"] == raw["export_id"]
        data = bytearray((artifacts / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        damaged = artifacts.parent / "damaged"
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(artifacts, damaged)
        (damaged / name).write_bytes(bytes(data))
        with pytest.raises(CorruptArtifactError, match=f"{name} is damaged"):
            EdgeLearner(damaged)


def test_another_exports_files_are_detected_at_load(mlp_source, tmp_path):
    model, artifacts = mlp_source
    other = export_copy(model, tmp_path / "other")
    graphs_mixed = tmp_path / "graphs_mixed"
    shutil.copytree(artifacts, graphs_mixed)
    shutil.copy(other / "training_model.onnx", graphs_mixed / "training_model.onnx")
    with pytest.raises(
        ArtifactMismatchError, match="training_model.onnx belongs to another export"
    ):
        EdgeLearner(graphs_mixed)
    # the other export's manifest, checkpoint and history next to this export's graphs
    state_mixed = tmp_path / "state_mixed"
    shutil.copytree(artifacts, state_mixed)
    for name in ("manifest.json", "checkpoint-000000", "importance_history-000000.npz"):
        shutil.copy(other / name, state_mixed / name)
    with pytest.raises(ArtifactMismatchError, match="belongs to another export"):
        EdgeLearner(state_mixed)
    with pytest.raises(ArtifactMismatchError, match="belongs to another export"):
        read_device_checkpoint(state_mixed)


def test_format_2_without_graph_hashes_still_loads_and_saves(mlp_case):
    _, artifacts = mlp_case
    raw = read_manifest(artifacts)
    old = {k: v for k, v in raw.items() if k not in ("export_id", "graphs_sha256")}
    write_manifest(artifacts, {**old, "format_version": 2})
    learner = EdgeLearner(artifacts)
    learner.learn_task([(X, Y)])
    learner.end_task([(X, Y)])
    learner.save()
    back = read_manifest(artifacts)
    assert back["format_version"] == 2 and back["generation"] == 1
    assert EdgeLearner(artifacts).num_tasks == 3


# 3. writers --------------------------------------------------------------------------------


def _trained(artifacts: Path) -> EdgeLearner:
    learner = EdgeLearner(artifacts)
    learner.learn_task([(X, Y)], lr=0.5)
    learner.end_task([(X, Y)])
    return learner


def test_a_stale_writer_is_refused_and_changes_nothing(device_case, tmp_path):
    _, artifacts = device_case
    first, second = _trained(artifacts), _trained(artifacts)
    first.save()
    before = _snapshot(artifacts)
    with pytest.raises(StaleWriterError, match="generation 1 but this learner loaded generation 0"):
        second.save()
    assert _snapshot(artifacts) == before
    assert EdgeLearner(artifacts).manifest.generation == 1
    second.save(tmp_path / "elsewhere")  # the stale learner's work can still go to a new folder
    assert EdgeLearner(tmp_path / "elsewhere").num_tasks == 3


def test_saving_into_another_exports_folder_is_refused(mlp_source, tmp_path):
    model, artifacts = mlp_source
    other = export_copy(model, tmp_path / "other")
    before = _snapshot(other)
    learner = _trained(shutil.copytree(artifacts, tmp_path / "mine"))
    with pytest.raises(ArtifactMismatchError, match="holds artifacts of another export"):
        learner.save(other)
    assert _snapshot(other) == before


def test_saving_into_a_copy_at_a_later_generation_goes_above_it(device_case, tmp_path):
    _, artifacts = device_case
    ahead = tmp_path / "ahead"
    shutil.copytree(artifacts, ahead)
    for _ in range(3):
        EdgeLearner(ahead).save()
    assert read_manifest(ahead)["generation"] == 3
    _trained(artifacts).save(ahead)
    assert read_manifest(ahead)["generation"] == 4 and EdgeLearner(ahead).num_tasks == 3


class Crash(BaseException):
    """An interrupt at a chosen step (BaseException: no `except Exception` may swallow it)."""


def test_a_kill_at_any_step_of_a_save_leaves_a_loadable_folder(device_case, tmp_path, monkeypatch):
    """Interrupt the k-th file operation of a save for every k: the folder loads with either
    the old or the new generation, and the next save from a fresh learner succeeds."""
    _, base = device_case
    old = EdgeLearner(base).parameters()
    k, completed = 0, False
    while not completed:
        k += 1
        folder = tmp_path / f"k{k}"
        shutil.copytree(base, folder)
        learner = _trained(folder)
        new = learner.parameters()
        calls = {"n": 0, "crash_at": k}

        def crashing(real, calls=calls):
            def wrapper(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == calls["crash_at"]:
                    raise Crash(f"step {calls['n']}")
                return real(*args, **kwargs)

            return wrapper

        with monkeypatch.context() as m:
            for name in ("replace", "fsync", "unlink"):
                m.setattr(os, name, crashing(getattr(os, name)))
            try:
                learner.save()
                completed = True
            except Crash:
                pass
        loaded = EdgeLearner(folder)
        expected = new if loaded.manifest.generation == 1 else old
        assert loaded.num_tasks == (3 if loaded.manifest.generation == 1 else 2)
        for n, w in loaded.parameters().items():
            assert np.array_equal(w, expected[n]), (k, n)
        _trained(folder).save()
        names = sorted(p.name for p in folder.iterdir())
        assert [n for n in names if n.startswith(("checkpoint-", "importance_history-"))] == [
            f"checkpoint-{loaded.manifest.generation + 1:06d}",
            f"importance_history-{loaded.manifest.generation + 1:06d}.npz",
        ]
        assert not [n for n in names if n.startswith(".")], names
    assert k > 5  # the loop really interrupted several steps


def _disk_full_script(artifacts: Path, limit: int) -> str:
    then = f"""
        import resource, signal
        from softmask_edge import SaveLocationError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        try:
            learner.save()
        except SaveLocationError as e:
            print("SaveLocationError", e)
        """
    return device_script(artifacts, X, Y, then)


@pytest.mark.parametrize("which", ["checkpoint", "history"])
def test_disk_full_leaves_no_partial_file_and_the_old_generation(mlp_case, which):
    """A real write failure (RLIMIT_FSIZE, the kernel's EFBIG) while writing the checkpoint or
    the history: SaveLocationError, and the folder is byte-for-byte what it was."""
    _, artifacts = mlp_case
    before = _snapshot(artifacts)
    ckpt, hist = len(before["checkpoint-000000"]), len(before["importance_history-000000.npz"])
    # the new checkpoint has the old one's tensors; the new history holds one task more
    assert hist > ckpt + 256, (hist, ckpt)
    limit = ckpt // 2 if which == "checkpoint" else ckpt + 256
    proc = subprocess.run(
        [sys.executable, "-c", _disk_full_script(artifacts, limit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    failed = "checkpoint-000001" if which == "checkpoint" else "importance_history-000001.npz"
    assert proc.stdout.startswith(f"SaveLocationError cannot write {artifacts / failed}"), (
        proc.stdout + proc.stderr[-2000:]
    )
    assert _snapshot(artifacts) == before
    assert sorted(os.listdir(artifacts)) == sorted(before)


# 4. onnxruntime's own exception types ------------------------------------------------------


def test_onnxruntime_exceptions_are_wrapped(mlp_case):
    """A graph whose hash was updated (deliberately, or a format-2 folder without graph hashes)
    but that onnxruntime cannot parse: our error, caused by onnxruntime's own type."""
    _, artifacts = mlp_case
    (artifacts / "importance_update.onnx").write_bytes(b"\x08\x07" + bytes(range(64)))
    rehash(artifacts)
    with pytest.raises(ArtifactMismatchError, match="InvalidProtobuf") as info:
        EdgeLearner(artifacts)
    cause = type(info.value.__cause__)
    assert cause is ort_errors.InvalidProtobuf and not issubclass(cause, RuntimeError)


def test_onnxruntime_errors_inside_a_step_are_wrapped(mlp_source, tmp_path):
    """Another export's importance graph (other storage dtype) under a consistent hash: the
    importance pass fails inside onnxruntime and comes back as our error naming the step."""
    model, artifacts = mlp_source
    other = export_copy(model, tmp_path / "other", importance_dtype="uint8")
    mine = tmp_path / "mine"
    shutil.copytree(artifacts, mine)
    shutil.copy(other / "importance_update.onnx", mine / "importance_update.onnx")
    rehash(mine)
    learner = EdgeLearner(mine)
    learner.learn_task([(X, Y)])
    with pytest.raises(EdgeError, match=r"end_task\(2\): onnxruntime raised") as info:
        learner.end_task([(X, Y)])
    assert type(info.value.__cause__).__module__ == ort_errors.__name__
    assert learner.num_tasks == 2


# 5. batches refused before any weight changes ---------------------------------------------


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_non_finite_batches_are_refused_before_any_step(device_case, poison):
    _, artifacts = device_case
    learner = EdgeLearner(artifacts)
    weights, importance = learner.parameters(), learner.importance()
    bad = X.copy()
    bad[3, 2] = poison
    with pytest.raises(BatchError, match="input 'input' holds NaN or Inf"):
        learner.learn_task([(X, Y), (bad, Y)], epochs=2)
    with pytest.raises(BatchError, match="NaN or Inf"):
        learner.learn_task([(X, Y)], validation=[(bad, Y)])
    with pytest.raises(BatchError, match="NaN or Inf"):
        learner.end_task([(X, Y), (bad, Y)])
    for bad_args in ({"lr": float("nan")}, {"lr": float("inf")}, {"lr": "0.1"}, {"epochs": 1.5}):
        with pytest.raises(ArgumentError):
            learner.learn_task([(X, Y)], **bad_args)
    for n, w in learner.parameters().items():
        assert w.tobytes() == weights[n].tobytes(), n
    for n, a in learner.importance().items():
        assert a.tobytes() == importance[n].tobytes(), n
    assert learner.num_tasks == 2
    learner.learn_task([(X, Y)])  # the learner is still usable
    assert any(not np.array_equal(w, weights[n]) for n, w in learner.parameters().items())


# 6. the manifest's JSON ---------------------------------------------------------------------


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        ({"head_classes": ["4"]}, CorruptArtifactError, "bad 'head_classes'"),
        ({"head_classes": [2, 10**12]}, CorruptArtifactError, "bad 'head_classes'"),
        ({"num_tasks": "1000000000"}, CorruptArtifactError, "bad 'num_tasks'"),
        ({"num_tasks": 10**9}, CorruptArtifactError, "exceeds the 4 declared heads"),
        ({"num_tasks": True}, CorruptArtifactError, "bad 'num_tasks'"),
        ({"generation": -1}, CorruptArtifactError, "bad 'generation'"),
        ({"params": {"backbone.0.weight": [10**6, 10**6]}}, ArtifactMismatchError, "claim"),
        ({"params": {"backbone.0.weight": [2] * 40}}, CorruptArtifactError, "bad 'params'"),
        ({"inputs": [{"name": "input"}]}, CorruptArtifactError, "bad 'inputs'"),
        (
            {"inputs": [{"name": "input", "dtype": "float3", "shape": [None, 6]}]},
            CorruptArtifactError,
            "bad 'inputs'",
        ),
        ({"task_names": "x"}, CorruptArtifactError, "bad 'task_names'"),
        ({"learning_rate": "high"}, CorruptArtifactError, "bad 'learning_rate'"),
        ({"export_id": "x"}, CorruptArtifactError, "export_id"),
        ({"surprise": 1}, CorruptArtifactError, "unknown field 'surprise'"),
        ({"graphs_sha256": {"x.onnx": "0" * 64}}, CorruptArtifactError, "must cover exactly"),
        ({"checkpoint_sha256": 5}, CorruptArtifactError, "bad 'checkpoint_sha256'"),
    ],
)
def test_manifest_fields_are_checked_before_anything_is_allocated(mlp_case, edit, error, message):
    _, artifacts = mlp_case
    raw = read_manifest(artifacts)
    if "params" in edit:
        edit = {"params": {**raw["params"], **edit["params"]}}
    write_manifest(artifacts, {**raw, **edit})
    peak = _peak_kib()
    with pytest.raises(error, match=message):
        EdgeLearner(artifacts)
    assert _peak_kib() - peak < 16 * 1024


def test_a_shared_head_task_count_must_fit_the_history_bytes(tmp_path):
    """Without declared heads, num_tasks is bounded by what the history file can hold."""
    import torch
    from edge_helpers import SmallCNN

    from softmask_peft import SoftMaskConfig, get_softmask_model

    torch.manual_seed(0)
    cnn = get_softmask_model(SmallCNN(), SoftMaskConfig(head_modules=["fc"]))
    artifacts = export_copy(cnn, tmp_path / "cnn", example=torch.randn(2, 1, 8, 8))
    assert read_manifest(artifacts)["task_mode"] == "shared_head"
    raw = read_manifest(artifacts)
    write_manifest(artifacts, {**raw, "num_tasks": 10**9})
    peak = _peak_kib()
    with pytest.raises(ArtifactMismatchError, match="task\\(s\\) of importance need more bytes"):
        EdgeLearner(artifacts)
    assert _peak_kib() - peak < 16 * 1024


def test_oversized_and_deeply_nested_manifests_are_corrupt(mlp_case):
    _, artifacts = mlp_case
    raw = read_manifest(artifacts)
    (artifacts / "manifest.json").write_text(json.dumps({**raw, "pad": "x" * MAX_MANIFEST_BYTES}))
    with pytest.raises(CorruptArtifactError, match="larger than"):
        EdgeLearner(artifacts)
    (artifacts / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CorruptArtifactError, match="RecursionError"):
        EdgeLearner(artifacts)
    (artifacts / "manifest.json").write_text(
        '{"format_version": 3, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )
    with pytest.raises(CorruptArtifactError, match="RecursionError"):
        EdgeLearner(artifacts)
    write_manifest(artifacts, {k: v for k, v in raw.items() if k != "checkpoint"})
    with pytest.raises(CorruptArtifactError, match="missing 'checkpoint'"):
        EdgeLearner(artifacts)


def test_a_reexport_makes_a_loaded_learner_stale(mlp_case):
    model, artifacts = mlp_case
    learner = _trained(artifacts)
    export_copy(model, artifacts)
    with pytest.raises(StaleWriterError, match="another writer saved since"):
        learner.save()
    assert EdgeLearner(artifacts).num_tasks == 2


def test_a_reexport_killed_at_any_step_leaves_one_whole_export(mlp_case, tmp_path, monkeypatch):
    """build_artifacts commits through a staging folder: interrupted before the commit point
    the old export stays, after it the next load rolls the new one forward; never a mix."""
    model, base = mlp_case
    old_id = read_manifest(base)["export_id"]
    k, completed, outcomes = 0, False, set()
    while not completed:
        k += 1
        folder = tmp_path / f"k{k}"
        shutil.copytree(base, folder)
        calls = {"n": 0, "crash_at": k}
        real = os.replace

        def crashing(*args, calls=calls, real=real):
            calls["n"] += 1
            if calls["n"] == calls["crash_at"]:
                raise Crash(f"os.replace #{calls['n']}")
            return real(*args)

        with monkeypatch.context() as m:
            m.setattr(os, "replace", crashing)
            try:
                export_copy(model, folder)
                completed = True
            except Crash:
                pass
        loaded = EdgeLearner(folder)  # verifies every hash; rolls a committed export forward
        outcomes.add("old" if loaded.manifest.export_id == old_id else "new")
        assert not [p for p in folder.iterdir() if p.name.startswith(".")], k
        loaded.learn_task([(X, Y)])
    assert outcomes == {"old", "new"} and k > 4


def test_unusable_save_locations_raise_save_location_error(device_case, tmp_path):
    _, artifacts = device_case
    learner = EdgeLearner(artifacts)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SaveLocationError, match="not a directory"):
        learner.save(blocker)
    with pytest.raises(SaveLocationError, match="a_file"):
        learner.save(blocker / "inside")
    with pytest.raises(SaveLocationError, match="a_file"):
        learner.export_inference(blocker / "model.onnx")
    assert blocker.read_text() == "" and learner.manifest.generation == 0


def _format_2(artifacts: Path) -> None:
    """Turn format-3 artifacts into format 2, whose graphs are not hashed."""
    raw = read_manifest(artifacts)
    old = {k: v for k, v in raw.items() if k not in ("export_id", "graphs_sha256")}
    write_manifest(artifacts, {**old, "format_version": 2})


@pytest.mark.parametrize(
    ("graph", "name", "step"),
    [
        # a name that is not UTF-8: the graph no longer takes the input the learner folds in
        ("training_model.onnx", b"softmask_scale", "does not fit its checkpoint"),
        # an optimizer graph without the recorded learning rate
        ("optimizer_model.onnx", b"softmask.learning_rate", "no 'softmask.learning_rate'"),
    ],
)
def test_damaged_graphs_without_hashes_still_end_in_our_error(mlp_case, graph, name, step):
    """Format 2 does not hash its graphs, so onnxruntime parses damaged ones: what escaped in
    a fuzz run of such folders (UnicodeDecodeError, ValueError) is now our error."""
    _, artifacts = mlp_case
    _format_2(artifacts)
    data = (artifacts / graph).read_bytes()
    assert name in data
    (artifacts / graph).write_bytes(data.replace(name, b"\x80" + name[1:]))
    with pytest.raises(ArtifactMismatchError, match=step):
        learner = EdgeLearner(artifacts)
        learner.learn_task([(X, Y)])


def test_session_graphs_leave_no_copy_and_survive_a_tmp_cleaner(mlp_case, tmp_path):
    """A session's graphs hold the importance as constants: they sit in the temp folder only
    while onnxruntime reads them, and a cleaner that removes the folder breaks nothing."""
    _, artifacts = mlp_case
    data = numpy_batches(batches(2))
    reference = EdgeLearner(artifacts)
    reference.learn_task(data, epochs=2, lr=0.1)
    reference.end_task(data)

    learner = EdgeLearner(artifacts)
    folder = Path(learner._runtime._session._workdir.name)
    assert folder.is_dir() and not list(folder.iterdir())
    shutil.rmtree(folder)
    learner.learn_task(data, epochs=2, lr=0.1)  # its graph is built: nothing to write
    learner.end_task(data)  # a new graph (s = 0): the folder is made again, then emptied
    assert not list(folder.iterdir())
    shutil.rmtree(folder)
    learner.export_inference(tmp_path / "model.onnx")  # onnxruntime reads the eval graph again
    assert not list(folder.iterdir())
    for ours, theirs in (
        (learner.parameters(), reference.parameters()),
        (learner.importance(), reference.importance()),
    ):
        assert all(np.array_equal(ours[n], theirs[n]) for n in theirs)
    assert onnx.load(tmp_path / "model.onnx").graph.output[0].name == "logits"
