"""The ONNX Runtime Training side of `EdgeLearner`: one training session and the update graph."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from softmask_format.atomic import atomic_write
from softmask_format.version import __version__

from . import _ort
from .checkpoint import load_state
from .errors import ArtifactMismatchError, EdgeError, OnnxRuntimeError, UnsupportedFormatError
from .manifest import (
    EVAL_MODEL_NAME,
    IMPORTANCE_MODEL_NAME,
    IMPORTANCE_SUFFIX,
    LOGITS_OUTPUT,
    MEAN_IMPORTANCE,
    MEASURED_SHAPES_SINCE,
    OPTIMIZER_MODEL_NAME,
    SCALE_INPUT,
    TRAINING_MODEL_NAME,
    Manifest,
)
from .session_graphs import guessed_broadcasts, index_bounds, wrong_broadcasts


class OrtRuntime:
    """A training session whose graphs hold s, A and ā as constants, plus the update graph.

    Args:
        directory, manifest: the loaded artifacts (files verified by the caller).
        seed: onnxruntime's global random seed (dropout in training graphs); None leaves it.
        threads: intra-op threads of the sessions (default: onnxruntime's choice).
    """

    def __init__(
        self, directory: Path, manifest: Manifest, seed: int | None, threads: int | None
    ) -> None:
        self.directory, self.manifest = directory, manifest
        if seed is not None:
            ort.set_seed(seed)
        self._options = ort.SessionOptions()
        if threads is not None:
            self._options.intra_op_num_threads = threads
        self._options.log_severity_level = 3
        # idle worker threads sleep instead of spinning: a device shares its cores with the app
        self._options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        state = load_state(directory, manifest)
        self._scale: float | None = 1.0  # s in the session's training graph (None: rebuild)
        with self._fitting():
            self._session = _ort.TrainingSession(
                directory / TRAINING_MODEL_NAME,
                directory / EVAL_MODEL_NAME,
                directory / OPTIMIZER_MODEL_NAME,
                state,
                self._options,
                lr_in_graph=manifest.format_version >= 2,
                constants=self._constants(state, 1.0),
            )
            self._importance_session = ort.InferenceSession(
                directory / IMPORTANCE_MODEL_NAME, self._options, providers=["CPUExecutionProvider"]
            )
        _refuse_guessed_gradients(directory, manifest, *self._session.graphs)
        integer = [i.name for i in manifest.inputs if i.dtype in ("int32", "int64")]
        self.index_bounds = index_bounds(self._session.graphs[0], integer, manifest.params)
        self.max_batch = None  # the graphs take any batch size

    def translated(
        self, step: str, error: type[EdgeError] = OnnxRuntimeError
    ) -> contextlib.AbstractContextManager[None]:
        return _ort.translated(step, error)

    def _fitting(self) -> contextlib.AbstractContextManager[None]:
        return _ort.translated(
            f"the graphs in {str(self.directory)!r} do not fit its checkpoint",
            ArtifactMismatchError,
        )

    def _constants(self, state: _ort.C.CheckpointState, scale: float) -> dict[str, np.ndarray]:
        """What a session's training graph holds as constants: s, the stored A and ā."""
        names = [n + IMPORTANCE_SUFFIX for n in self.manifest.masked] + [MEAN_IMPORTANCE]
        return {
            SCALE_INPUT: np.array(scale, np.float32),
            **{n: _ort.get_parameter(state, n) for n in names},
        }

    # tensors ------------------------------------------------------------------------------

    def get(self, name: str) -> np.ndarray:
        return _ort.get_parameter(self._session.state, name)

    def set(self, values: Mapping[str, np.ndarray]) -> None:
        for name, value in values.items():
            _ort.set_parameter(self._session.state, name, value)
        if any(n.endswith(IMPORTANCE_SUFFIX) or n == MEAN_IMPORTANCE for n in values):
            self._scale = None  # the session's constants hold the old importance

    # steps --------------------------------------------------------------------------------

    def use_scale(self, scale: float) -> bool:
        """Rebuild the session's training graph for `scale` unless it already runs it.

        The stored importance changes only in `end_task`, which forces the next rebuild; a
        rebuild drops the optimizer. The Python learner reads gradients from the state, so
        its graphs drop the gradient outputs.
        """
        if self._scale == scale:
            return False
        self._scale = None
        with self._fitting():
            self._session.specialize(
                self._constants(self._session.state, scale), gradient_outputs=False
            )
        self._scale = scale
        return True

    def new_optimizer(self, lr: float) -> None:
        self._session.new_optimizer(lr)

    def set_learning_rate(self, lr: float) -> None:
        self._session.set_learning_rate(lr)

    def train_step(self, feeds: Mapping[str, np.ndarray]) -> float:
        self._session.reset_gradients()
        loss = float(self._session.run(feeds, training=True)[0])
        self._session.optimizer_step()
        return loss

    def eval_step(self, feeds: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray]:
        loss, logits = self._session.run(feeds, training=False)[:2]
        return float(loss), logits

    def gradient_sums(
        self, batches: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """The training graph accumulates gradients across runs until they are reset."""
        self._session.reset_gradients()
        for feeds in batches:
            self._session.run(feeds, training=True)
        return {n: _ort.get_gradient(self._session.state, n).copy() for n in names}

    def update_importance(
        self, grads: Mapping[str, Sequence[np.ndarray]]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
        """Runs `importance_update.onnx` (graphs.importance_update_model)."""
        feeds = {}
        for n, per_head in grads.items():
            feeds[n + ".grads"] = np.stack(per_head)
            feeds[n + IMPORTANCE_SUFFIX] = self.get(n + IMPORTANCE_SUFFIX)
        names = [o.name for o in self._importance_session.get_outputs()]
        out = dict(zip(names, self._importance_session.run(names, feeds)))
        return (
            {n: out[n + ".task_importance"] for n in grads},
            {n: out[n + IMPORTANCE_SUFFIX + ".updated"] for n in grads},
            out[MEAN_IMPORTANCE + ".updated"],
        )

    # files --------------------------------------------------------------------------------

    def write_checkpoint(self, path: str | os.PathLike) -> None:
        _ort.save_checkpoint(self._session.state, path)

    def export_inference(self, path: str | os.PathLike) -> None:
        atomic_write(path, lambda tmp: self._session.export_inference(tmp, [LOGITS_OUTPUT]))


def _refuse_guessed_gradients(
    directory: Path, manifest: Manifest, training: onnx.ModelProto, evaluation: onnx.ModelProto
) -> None:
    """UnsupportedFormatError for artifacts exported before format 4 whose training graph has
    a broadcast gradient ORT built on a guess that was wrong (`guessed_broadcasts`, then
    `wrong_broadcasts`): their gradients are wrong at batch >= 2 (BERT's position table was).
    MLP and CNN graphs have no guess; a guess that cannot be measured counts as wrong."""
    if manifest.format_version >= MEASURED_SHAPES_SINCE:
        return
    guessed = guessed_broadcasts(training)
    if not guessed:
        return
    try:
        wrong = wrong_broadcasts(evaluation, guessed)
    except Exception:  # onnxruntime raises its own types from C++; a graph that cannot run
        wrong = [x.node for x in guessed]
    if wrong:
        raise UnsupportedFormatError(
            f"{str(directory)!r}: device format {manifest.format_version} artifacts whose "
            f"gradient graph ONNX Runtime built on a wrong broadcast guess ({len(wrong)} "
            f"node(s), e.g. {wrong[0]}): their gradients are wrong at batch >= 2 (BERT's "
            "position embedding was); export the model again with this release "
            f"(softmask-peft {__version__}, device format {MEASURED_SHAPES_SINCE}): "
            "export_for_device(model, example, directory)"
        )
