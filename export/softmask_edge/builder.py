"""Build ONNX Runtime Training artifacts with soft-masking inside the training graph.

Input: a forward ONNX graph (user inputs [+ `task_id`] -> `logits`, parameters as
initializers named like the framework's parameters), the parameter roles and the accumulated
importance. Output directory:

    manifest.json               what was exported; names the current checkpoint generation
    training_model.onnx         forward + loss + gradients, masked before accumulation
    eval_model.onnx             forward + loss, dropout off
    optimizer_model.onnx        SGD or AdamW
    importance_update.onnx      plain inference graph: new task's importance, max-accumulated
    checkpoint-000000           trainable parameters + `P.softmask_importance` (non-trainable)
    importance_history-000000.npz   per-task importance `task.{k}.{P}` (storage dtype)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from softmask_format.atomic import atomic_write, commit_files

from .errors import ExportError
from .generation import check_roles, first_generation, stored_importance
from .graphs import (
    add_classification_loss,
    add_gradient_outputs,
    add_importance_inputs,
    expose_gradients,
    insert_masking,
    record_learning_rate,
)
from .importance_graph import importance_update_model
from .manifest import (
    EVAL_MODEL_NAME,
    EXPORT_ID_KEY,
    IMPORTANCE_DTYPES,
    IMPORTANCE_MODEL_NAME,
    LOSSES,
    OPTIMIZER_MODEL_NAME,
    OPTIMIZERS,
    STATIC_FILES,
    TASK_INPUT,
    TASK_MODES,
    TRAINING_MODEL_NAME,
    InputSpec,
    Manifest,
    capacity_fields,
    checkpoint_name,
    package_versions,
)
from .shapes import measure_shapes

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.FLOAT16: "float16",
}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Route the C++ info log lines of ORT's graph builders away from the terminal (fd 2)."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _optimizer_block(name: str):
    from onnxruntime.training import onnxblock

    if name == "sgd":
        return onnxblock.optim.SGD()
    return onnxblock.optim.AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def _input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {i.name for i in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers or value.name == TASK_INPUT:
            continue
        t = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        specs.append(InputSpec(value.name, _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), shape))
    return specs


def _check_logits(model: onnx.ModelProto) -> None:
    """The device loss is cross-entropy over (batch, classes) logits with (batch,) labels.

    Token-level language modelling (logits (batch, sequence, vocab), labels (batch, sequence),
    shifted for causal LMs, with an ignore index) is refused here, at export time, instead of
    failing on the device with a batch or onnxruntime shape error.
    """
    outputs = list(model.graph.output)
    if len(outputs) != 1 or not outputs[0].type.tensor_type.HasField("shape"):
        return  # add_classification_loss names the output problem
    rank = len(outputs[0].type.tensor_type.shape.dim)
    if rank == 2:
        return
    kind = (
        "(batch, sequence, vocab): a language model with token-level labels"
        if rank == 3
        else f"rank {rank}"
    )
    raise ExportError(
        f"cannot train this model on a device: its logits have shape {kind}, and the device "
        "loss is sequence-level cross-entropy over (batch, classes) logits with (batch,) "
        "labels. Export a classification model (e.g. AutoModelForSequenceClassification, or "
        "a head on pooled features), or keep training this model on the server."
    )


def build_artifacts(
    forward: onnx.ModelProto,
    directory: str | os.PathLike,
    *,
    trainable: Sequence[str],
    masked: Sequence[str],
    heads: Sequence[str],
    head_classes: Sequence[int],
    task_mode: str,
    importance: Mapping[str, np.ndarray],
    history: Sequence[Mapping[str, np.ndarray]] = (),
    importance_dtype: str = "float32",
    loss: str = "cross_entropy",
    optimizer: str = "sgd",
    task_names: Sequence[str] = (),
    versions: Mapping[str, str] | None = None,
    learning_rate: float = 0.05,
    scale_heads: bool = True,
    capacity: Mapping[str, Any] | None = None,
) -> Manifest:
    """Turn `forward` into training artifacts in `directory` (files replaced atomically, manifest last).

    `importance` is the accumulated A (float32 in [0, 1]) of every masked parameter; `history`
    the per-task importance of the tasks already learned (len = the number of finished tasks).
    `learning_rate` is recorded in the optimizer graph (a learner rewrites it per task).
    `scale_heads=False` leaves the head gradients unscaled (`head_scaling="except_new"` of a
    task-incremental model, where only the current task's head gets a gradient). `capacity`
    holds the keyword arguments of `importance_update_model` (sharpness, budget, decay,
    cross_heads) that shape what the device's importance update keeps; None: the paper's rule.
    """
    for name, value, allowed in (
        ("task_mode", task_mode, TASK_MODES),
        ("loss", loss, LOSSES),
        ("optimizer", optimizer, OPTIMIZERS),
        ("importance_dtype", importance_dtype, IMPORTANCE_DTYPES),
    ):
        if value not in allowed:
            raise ExportError(f"{name} must be one of {allowed}, got {value!r}")
    if not masked:
        raise ExportError("nothing to mask: the model has no masked parameter")
    if not learning_rate > 0:
        raise ExportError(f"learning_rate must be > 0, got {learning_rate}")
    model = onnx.ModelProto()
    model.CopyFrom(forward)
    params = {i.name: i for i in model.graph.initializer}
    importance = {k: np.asarray(v, np.float32) for k, v in importance.items()}
    check_roles(
        {n: tuple(p.dims) for n, p in params.items()},
        [n for n, p in params.items() if p.data_type != onnx.TensorProto.FLOAT],
        trainable,
        masked,
        heads,
        importance,
    )
    has_task_input = any(i.name == TASK_INPUT for i in model.graph.input)
    if has_task_input != (task_mode == "task_incremental"):
        raise ExportError(
            f"a {task_mode} graph {'needs' if not has_task_input else 'cannot have'} a {TASK_INPUT!r} input"
        )
    _check_logits(model)
    inputs = _input_specs(model)
    shapes = {n: list(params[n].dims) for n in trainable}
    masked_shapes = {n: shapes[n] for n in masked}
    trainable_tensors = [onnx.TensorProto() for _ in trainable]
    for t, n in zip(trainable_tensors, trainable):
        t.CopyFrom(params[n])
    num_classes = model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    try:
        measure_shapes(model)  # before ORT builds broadcast gradients from guessed shapes
    except Exception as e:  # onnxruntime raises its own types from C++
        raise ExportError(f"cannot run the forward graph to measure its shapes: {e}") from e
    add_gradient_outputs(model)
    add_classification_loss(model)

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"cannot export into {str(directory)!r}: it is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    export_id = secrets.token_hex(16)
    built: list[Manifest] = []

    def write(staging: Path) -> None:
        _generate(model, trainable, optimizer, staging)
        training = onnx.load(staging / TRAINING_MODEL_NAME)
        insert_masking(training, masked_shapes, heads if scale_heads else [], importance_dtype)
        expose_gradients(training)
        _save_stamped(training, staging / TRAINING_MODEL_NAME, export_id)
        evaluation = onnx.load(staging / EVAL_MODEL_NAME)
        add_importance_inputs(evaluation, masked_shapes, importance_dtype)
        _save_stamped(evaluation, staging / EVAL_MODEL_NAME, export_id)
        optimizer_graph = onnx.load(staging / OPTIMIZER_MODEL_NAME)
        if optimizer == "adamw":
            _use_torch_adamw(optimizer_graph)
        record_learning_rate(optimizer_graph, learning_rate)
        _save_stamped(optimizer_graph, staging / OPTIMIZER_MODEL_NAME, export_id)
        _save_stamped(
            importance_update_model(masked_shapes, importance_dtype, **(capacity or {})),
            staging / IMPORTANCE_MODEL_NAME,
            export_id,
        )
        (staging / "checkpoint").unlink()
        stored = [
            numpy_helper.from_array(a, n)
            for n, a in stored_importance(masked, importance, importance_dtype).items()
        ]
        _write_checkpoint(staging / checkpoint_name(0), trainable_tensors, stored)
        checkpointed = {t.name for t in (*trainable_tensors, *stored)}
        manifest = first_generation(
            staging,
            STATIC_FILES,
            history,
            task_mode=task_mode,
            inputs=inputs,
            params=shapes,
            masked=list(masked),
            heads=list(heads),
            head_classes=[int(c) for c in head_classes],
            num_classes=int(num_classes),
            importance_dtype=importance_dtype,
            loss=loss,
            optimizer=optimizer,
            versions=package_versions(dict(versions or {})),
            task_names=list(task_names),
            parameter_order=[i.name for i in training.graph.input if i.name in checkpointed],
            heads_scaled=scale_heads,
            **capacity_fields(capacity),
            learning_rate=float(learning_rate),
            export_id=export_id,
        )
        built.append(manifest)

    # a journal (staging folder + commit marker): a re-export never leaves the old manifest
    # next to new graphs; a kill after the commit point is rolled forward by the next load
    commit_files(directory, write)
    return built[0]


def _save_stamped(model: onnx.ModelProto, path: Path, export_id: str) -> None:
    """Save `model` with the export id in its metadata: a graph names the export it belongs to."""
    onnx.helper.set_model_props(model, {EXPORT_ID_KEY: export_id})
    onnx.save(model, path)


def _generate(model: onnx.ModelProto, trainable: Sequence[str], optimizer: str, out: Path) -> None:
    from onnxruntime.training import artifacts

    try:
        with _quiet_stderr():
            artifacts.generate_artifacts(
                model,
                requires_grad=list(trainable),
                loss=None,
                optimizer=_optimizer_block(optimizer),
                artifact_directory=out,
            )
    except Exception as e:  # ORT raises bare RuntimeError/Fail from C++
        raise ExportError(f"onnxruntime could not build the training graph: {e}") from e


def _use_torch_adamw(model: onnx.ModelProto) -> None:
    """Switch ORT's AdamW kernel to PyTorch's formula (adam_mode 0).

    onnxblock builds the Hugging Face variant (adam_mode 1: eps added to sqrt(v) before the
    bias correction), which differs from torch.optim.AdamW by up to ~1e-3 per step on small
    gradients; device and server then disagree.
    """
    for node in model.graph.node:
        if node.op_type == "AdamWOptimizer":
            for attr in node.attribute:
                if attr.name == "adam_mode":
                    attr.i = 0


def _write_checkpoint(
    path: Path, trainable: list[onnx.TensorProto], frozen: list[onnx.TensorProto]
) -> None:
    from onnxruntime.training import onnxblock

    atomic_write(path, lambda tmp: onnxblock.save_checkpoint((trainable, frozen), tmp))
