"""The slice of ONNX Runtime's on-device training API that softmask_edge uses, torch-free.

`onnxruntime.training`'s package `__init__` imports its amp/optim helpers, which import torch
(they serve ORTModule), so on a device without torch `onnxruntime.training.api` cannot be
imported at all. The checkpoint, module and optimizer classes live in the core extension
module `onnxruntime.capi._pybind_state`; this file calls them directly.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnxruntime import SessionOptions
from onnxruntime.capi import _pybind_state as C
from onnxruntime.capi import onnxruntime_pybind11_state as _errors
from onnxruntime.capi.onnxruntime_inference_collection import OrtValue, get_ort_device_type

from .errors import ArtifactMismatchError, EdgeError, OnnxRuntimeError, SaveLocationError
from .session_graphs import set_learning_rate, specialize

# onnxruntime's own exception types subclass Exception directly, not RuntimeError; pybind11
# raises UnicodeDecodeError for a name in a damaged graph or checkpoint that is not UTF-8
ORT_ERRORS: tuple[type[Exception], ...] = (
    RuntimeError,
    DecodeError,
    UnicodeDecodeError,
    *(
        t
        for t in vars(_errors).values()
        if isinstance(t, type) and issubclass(t, Exception) and t.__module__ == _errors.__name__
    ),
)


@contextlib.contextmanager
def translated(step: str, error: type[EdgeError] = OnnxRuntimeError) -> Iterator[None]:
    """Re-raise onnxruntime's (and protobuf's) exceptions as `error`, naming `step`."""
    try:
        yield
    except EdgeError:
        raise
    except ORT_ERRORS as e:
        raise error(f"{step}: onnxruntime raised {type(e).__name__}: {e}") from e


def load_checkpoint(path: str | os.PathLike) -> C.CheckpointState:
    return C.load_checkpoint(os.fspath(path))


def save_checkpoint(state: C.CheckpointState, path: str | os.PathLike) -> None:
    """Weights and non-trainable tensors only; optimizer state is per task, never persisted."""
    C.save_checkpoint(state, os.fspath(path), False)


def write_checkpoint(
    trainable: Sequence[bytes], frozen: Sequence[bytes], path: str | os.PathLike
) -> None:
    """A new checkpoint from serialized TensorProtos (trainable, then non-trainable)."""
    C.save_checkpoint(list(trainable), list(frozen), os.fspath(path), False)


def parameter_names(state: C.CheckpointState) -> list[str]:
    return list(state.parameter_names())


def get_parameter(state: C.CheckpointState, name: str) -> np.ndarray:
    return state.get_parameter(name).data.numpy()


def get_gradient(state: C.CheckpointState, name: str) -> np.ndarray | None:
    grad = state.get_parameter(name).grad
    return grad.numpy() if grad.has_value() else None


def set_parameter(state: C.CheckpointState, name: str, value: np.ndarray) -> None:
    """Copy `value` into the checkpoint tensor (`Parameter.data = ...` crashes the process)."""
    state.copy_parameter_from(
        name, OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))._ortvalue
    )


class TrainingSession:
    """Training and eval graphs bound to one checkpoint state, plus a replaceable optimizer.

    `graphs` are the training and eval graphs as written. They are specialized per session
    (`specialize`): the tensors named in `constants` stop being inputs of the training graph
    and become constants ONNX Runtime folds when it builds the session (`graphs.specialize`).
    """

    def __init__(
        self,
        training_model: str | os.PathLike,
        eval_model: str | os.PathLike,
        optimizer_model: str | os.PathLike,
        state: C.CheckpointState,
        options: SessionOptions,
        lr_in_graph: bool,
        constants: Mapping[str, np.ndarray] | None = None,
        gradient_outputs: bool = False,
    ) -> None:
        self._options = options
        self._lr_in_graph = lr_in_graph
        self.learning_rate: float | None = None
        self._device = C.OrtDevice(get_ort_device_type("cpu", 0), C.OrtDevice.default_memory(), 0)
        self.graphs = onnx.load(os.fspath(training_model)), onnx.load(os.fspath(eval_model))
        self._optimizer_model = os.fspath(optimizer_model)
        self._workdir = tempfile.TemporaryDirectory(prefix="softmask_edge.")
        self._serialized: tuple[bytes, bytes] | None = None
        self._optimizer: C.Optimizer | None = None
        self._module = None
        self._optimizer_used = False  # an optimizer stepped: its state lives in `state`
        self.state = state
        self.specialize(constants or {}, gradient_outputs)

    def specialize(self, constants: Mapping[str, np.ndarray], gradient_outputs: bool) -> None:
        """Rebuild the module on graphs with `constants` folded in (see `graphs.specialize`).

        Every constant must be an input of the training graph. The optimizer goes with the
        old module: call `new_optimizer` before the next step. If the new module cannot be
        built, the session keeps its previous graphs and the error propagates.
        """
        training, evaluation = self.graphs
        declared = [{i.name for i in g.graph.input} for g in self.graphs]
        missing = sorted(set(constants) - declared[0])
        if missing:
            raise ArtifactMismatchError(
                f"the training graph does not take {missing}: it does not fit its checkpoint"
            )
        previous = self._serialized
        unused = [n for n in constants if n in declared[1]]
        self._serialized = (
            specialize(training, constants, gradient_outputs=gradient_outputs).SerializeToString(),
            specialize(evaluation, {}, unused).SerializeToString(),
        )
        try:
            self._bind(self.state)
        except BaseException:
            if previous is not None:
                self._serialized = previous
                with contextlib.suppress(Exception):
                    self._bind(self.state)
            raise

    @contextlib.contextmanager
    def _graph_files(self) -> Iterator[tuple[str, str]]:
        """The session's graphs as files while onnxruntime reads them (module creation, and
        `export_inference`, which reads the eval graph again); removed after, so a killed
        process leaves no copy of the importance in the temp folder."""
        folder = self._workdir.name
        paths = os.path.join(folder, "train.onnx"), os.path.join(folder, "eval.onnx")
        try:
            try:
                os.makedirs(folder, mode=0o700, exist_ok=True)  # again, if a tmp cleaner took it
                for path, data in zip(paths, self._serialized):
                    with open(path, "wb") as f:
                        f.write(data)
            except OSError as e:
                raise SaveLocationError(
                    f"cannot write the session's graphs into {folder}: {e.strerror or e}; "
                    "point TMPDIR at a writable folder"
                ) from e
            yield paths
        finally:
            for path in paths:
                with contextlib.suppress(OSError):
                    os.remove(path)

    def _bind(self, state: C.CheckpointState) -> None:
        # the C++ module and optimizer keep raw pointers into the state they were built on:
        # release them before that state can be freed
        self._optimizer = None
        self._module = None
        self.state = state
        with self._graph_files() as (training, evaluation):
            self._module = C.Module(training, state, evaluation, self._device, self._options)
        # read once, while loading: a damaged name fails here, not inside a later step
        self._input_names = {t: list(self._module.input_names(t)) for t in (True, False)}

    def run(self, feeds: Mapping[str, np.ndarray], training: bool) -> list[np.ndarray]:
        """One forward (+ backward and gradient accumulation when training) step.

        `feeds` maps input names to arrays; names the graph does not take are ignored.
        """
        names = self._input_names[training]
        missing = [n for n in names if n not in feeds]
        if missing:
            graph = "training" if training else "eval"
            raise ArtifactMismatchError(
                f"the {graph} graph takes inputs {missing} that its manifest does not declare"
            )
        fetches = C.OrtValueVector()
        ordered = [feeds[n] for n in names]
        if training:
            self._module.train_step(ordered, fetches)
        else:
            self._module.eval_step(ordered, fetches)
        return [v.numpy() for v in fetches]

    def reset_gradients(self) -> None:
        """The next training step overwrites the gradient buffers instead of adding to them."""
        self._module.lazy_reset_grad()

    def new_optimizer(self, lr: float) -> None:
        """A new optimizer whose state (step count, momenta) starts at zero.

        ORT keeps optimizer state inside the checkpoint state and a new `Optimizer` reuses it,
        so once a step was taken the state is round-tripped through a checkpoint written
        without optimizer state and the module is rebuilt on it. Format-2 artifacts carry the
        lr in the optimizer graph: a copy with `lr` written in is loaded instead.
        """
        with tempfile.TemporaryDirectory(prefix="softmask_edge.") as tmp:
            if self._optimizer_used:
                path = os.path.join(tmp, "state")
                save_checkpoint(self.state, path)
                self._bind(load_checkpoint(path))
                self._optimizer_used = False
            optimizer_model = self._optimizer_model
            if self._lr_in_graph:
                graph = onnx.load(optimizer_model)
                try:
                    set_learning_rate(graph, lr)
                except ValueError as e:
                    raise ArtifactMismatchError(f"{optimizer_model}: {e}") from e
                optimizer_model = os.path.join(tmp, "optimizer.onnx")
                onnx.save(graph, optimizer_model)
            self._optimizer = C.Optimizer(optimizer_model, self.state, self._device, self._options)
        if not self._lr_in_graph:
            self._optimizer.set_learning_rate(lr)
        self.learning_rate = lr

    def set_learning_rate(self, lr: float) -> None:
        """Change the lr within a task; with the lr in the graph the optimizer is recreated
        (SGD has no state; AdamW's moments and step count restart)."""
        if lr == self.learning_rate:
            return
        if self._lr_in_graph:
            self.new_optimizer(lr)
        else:
            self._optimizer.set_learning_rate(lr)
            self.learning_rate = lr

    def optimizer_step(self) -> None:
        self._optimizer.optimizer_step()
        self._optimizer_used = True

    def export_inference(self, path: str | os.PathLike, outputs: Sequence[str]) -> None:
        with self._graph_files():
            self._module.export_model_for_inferencing(os.fspath(path), list(outputs))
