"""Byte-level fuzzing of every file `EdgeLearner` reads: softmask_edge's own error or a load.

Random byte flips, insertions and truncations of the manifest, the checkpoint, the importance
history and each ONNX graph must end in an `EdgeError` (or a load that passed every check),
never another exception type, a hang or a large allocation. The manifest hashes every other
file, so a mutated checkpoint or graph is refused before onnxruntime parses a byte (a mutated
graph could crash onnxruntime itself). The second test also rewrites the hashes, as someone
who byte_edits the manifest on purpose would, to reach the checkpoint and history parsers.
"""

from __future__ import annotations

import resource
import shutil

import pytest
from edge_helpers import read_manifest, write_manifest
from helpers import byte_edits, mutate_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from softmask_edge import EdgeError, EdgeLearner
from softmask_edge.manifest import STATIC_FILES, sha256
from test_edge_reliability import X

FILES = ("manifest.json", "checkpoint-000000", "importance_history-000000.npz", *STATIC_FILES)
PEAK_KIB = 16 * 1024

def _load_or_refuse(folder) -> None:
    """Load, and if that works, use the learner once: a load must be a usable load."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        learner = EdgeLearner(folder)
        learner.predict(X)
        assert 0 <= learner.num_tasks <= 4
    except EdgeError:
        pass
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    assert grown < PEAK_KIB, f"peak memory grew by {grown} KiB"


@pytest.fixture(scope="module")
def pristine(mlp_source):
    _, artifacts = mlp_source
    EdgeLearner(artifacts).predict(X)  # warm up: onnxruntime's first session allocates arenas
    return artifacts


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.sampled_from(FILES), changes=byte_edits, cut=st.none() | st.floats(0, 1))
def test_a_mutated_artifact_loads_or_raises_our_error(pristine, tmp_path, name, changes, cut):
    target = tmp_path / "mutated"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(pristine, target)
    (target / name).write_bytes(mutate_bytes((pristine / name).read_bytes(), changes, cut))
    _load_or_refuse(target)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.sampled_from(FILES[1:3]), changes=byte_edits, cut=st.none() | st.floats(0.05, 1))
def test_a_mutated_state_with_matching_hashes_loads_or_raises_our_error(
    pristine, tmp_path, name, changes, cut
):
    target = tmp_path / "rehashed"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(pristine, target)
    (target / name).write_bytes(mutate_bytes((pristine / name).read_bytes(), changes, cut))
    raw = read_manifest(target)
    key = "checkpoint_sha256" if name.startswith("checkpoint") else "history_sha256"
    write_manifest(target, {**raw, key: sha256(target / name)})
    _load_or_refuse(target)


def test_the_fuzz_reaches_both_outcomes(pristine, tmp_path):
    """The mutation scheme can produce a load (a harmless manifest edit) and a refusal."""
    target = tmp_path / "edited"
    shutil.copytree(pristine, target)
    text = (target / "manifest.json").read_bytes()
    at = text.index(b'"learning_rate": 0.05') + len(b'"learning_rate": 0.0')
    where = (at + 0.5) / len(text)
    (target / "manifest.json").write_bytes(mutate_bytes(text, [(where, ord("7"), "f")], None))
    assert EdgeLearner(target).manifest.learning_rate == 0.07
    (target / "eval_model.onnx").write_bytes(b"")
    with pytest.raises(EdgeError, match="eval_model.onnx"):
        EdgeLearner(target)
