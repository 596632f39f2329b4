"""The device bridge, torch side: export for ONNX Runtime Training, and read back what a device learned.

`export_for_device` traces the model with `torch.onnx.export` (training mode, no constant
folding, TorchScript exporter) into a forward graph `inputs [+ task_id] -> logits` whose
initializers carry the model's own parameter names, then hands it to
`softmask_edge.build_artifacts`, which adds the loss, the gradient graph with the soft-mask
before each gradient accumulator, the optimizer and the importance-update graph.

Heads. A `MultiHeadClassifier` is exported task-incrementally: every head — the learned ones,
any extra heads already added to the model and `future_heads` declared now — is computed,
padded to the widest head with -1e4 logits, stacked, and one is picked by the scalar int64
input `task_id`. The device can learn as many new tasks as there are declared heads; the
price is that every step computes all heads (one extra (feature_dim x classes) matmul each)
and the checkpoint holds their weights from the start. Any other model is exported with its
head shared by all tasks (domain-incremental, no task input).
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from softmask_format.version import package_version
from torch import Tensor, nn

from .batches import logits_of
from .errors import ConfigError, InputTypeError, TaskOrderError
from .heads import MultiHeadClassifier
from .persistence import importance_problem
from .selection import select_parameters
from .store import TaskRecord

if TYPE_CHECKING:
    from softmask_edge import Manifest

PAD_LOGIT = -1e4
_PREFIX = "net."


class _MultiHeadGraph(nn.Module):
    """features -> every head (padded to `width`) -> stacked -> the `task_id` one."""

    def __init__(self, net: MultiHeadClassifier, width: int) -> None:
        super().__init__()
        self.net = net
        self.width = width

    def forward(self, x: Tensor, task_id: Tensor) -> Tensor:
        z = self.net.features(x)
        logits = [
            F.pad(h(z), (0, self.width - h.out_features), value=PAD_LOGIT) for h in self.net.heads
        ]
        return torch.stack(logits)[task_id]


class _SharedHeadGraph(nn.Module):
    """The model's own forward; HF outputs are reduced to `.logits`."""

    def __init__(self, net: nn.Module, names: Sequence[str] | None) -> None:
        super().__init__()
        self.net = net
        self.names = names

    def forward(self, *inputs: Tensor) -> Tensor:
        out = self.net(**dict(zip(self.names, inputs))) if self.names else self.net(*inputs)
        return logits_of(out)


def _inputs(example_inputs: Any) -> tuple[tuple[Tensor, ...], list[str], bool]:
    """(tensors, names, by_keyword) of the example inputs."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), ["input"], False
    if isinstance(example_inputs, Mapping):
        names = [k for k in example_inputs if k != "labels"]
        return tuple(example_inputs[k] for k in names), names, True
    if isinstance(example_inputs, (tuple, list)) and all(
        isinstance(t, Tensor) for t in example_inputs
    ):
        tensors = tuple(example_inputs)
        names = ["input"] if len(tensors) == 1 else [f"input_{i}" for i in range(len(tensors))]
        return tensors, names, False
    raise InputTypeError(
        "example_inputs must be a tensor, a tuple of tensors or a mapping name -> tensor, "
        f"got {type(example_inputs).__name__}"
    )


def _strip_prefix(model: Any, prefix: str) -> None:
    """Rename `net.X` initializers (and their uses) to the base model's own name `X`."""
    renames = {
        i.name: i.name[len(prefix) :] for i in model.graph.initializer if i.name.startswith(prefix)
    }
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]
    for value in model.graph.input:
        value.name = renames.get(value.name, value.name)


def _trace(
    graph: nn.Module,
    args: tuple[Tensor, ...],
    input_names: list[str],
    dynamic: dict[str, dict[int, str]],
    opset: int,
) -> Any:
    """torch.onnx.export as ONNX Runtime Training needs (training mode, no folding, TorchScript)."""
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        torch.onnx.export(
            graph,
            args,
            buffer,
            input_names=input_names,
            output_names=["logits"],
            dynamic_axes=dynamic,
            opset_version=opset,
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False,
            dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "softmask-peft": package_version()}


def _drop_zero_dropout(net: nn.Module) -> None:
    """Dropout with p = 0 becomes nn.Identity in the copy being exported: the same function,
    and no pass-through node (which XNNPACK's partitioner refuses: "already in the inputs")."""
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p == 0 and name:
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, nn.Identity())


@dataclass
class _DeviceGraph:
    """The model as a device graph: `module(*args)` -> logits, before any tracing."""

    module: nn.Module
    net: nn.Module  # the deep copy of the base model `module` computes with
    args: tuple[Tensor, ...]
    input_names: list[str]  # user inputs [+ "task_id"]
    names: list[str]  # user inputs only
    tensors: tuple[Tensor, ...]
    by_keyword: bool
    multi_head: bool
    head_classes: list[int] | None  # None: a shared head, read from the traced output


def _device_graph(
    model: Any, example_inputs: Any, future_heads: Sequence[int], multi_head_graph: type
) -> _DeviceGraph:
    """Copy the base model, add `future_heads`, wrap it as one graph with a task input."""
    tensors, names, by_keyword = _inputs(example_inputs)
    base = model.base_model
    if isinstance(base, MultiHeadClassifier) and base.adapter_rank:  # before copying the model
        raise ConfigError(
            "the device learners do not run task adapters (MultiHeadClassifier(adapter_rank > 0)): "
            "their per-task routing is not in the exported graphs; export a model without them"
        )
    net = copy.deepcopy(base)
    multi_head = isinstance(net, MultiHeadClassifier)
    if future_heads and not multi_head:
        raise ConfigError("future_heads needs a MultiHeadClassifier (task-incremental) model")
    for classes in future_heads:
        net.add_head(int(classes))
    head_classes = None
    if multi_head:
        if len(net.heads) <= model.num_tasks:
            raise ConfigError(
                f"{model.num_tasks} tasks are learned and the model has {len(net.heads)} heads: "
                "declare the device's tasks with future_heads=[num_classes, ...]"
            )
        if by_keyword or len(tensors) != 1:
            raise ConfigError("a MultiHeadClassifier takes exactly one input tensor")
        head_classes = [h.out_features for h in net.heads]
        module: nn.Module = multi_head_graph(net, max(head_classes))
        args = (*tensors, torch.tensor(0, dtype=torch.int64))
        input_names = [*names, "task_id"]
    else:
        module = _SharedHeadGraph(net, names if by_keyword else None)
        args = tensors
        input_names = names
    return _DeviceGraph(
        module, net, args, input_names, names, tensors, by_keyword, multi_head, head_classes
    )


def _forward_graph(
    model: Any, example_inputs: Any, future_heads: Sequence[int], opset: int
) -> tuple[Any, nn.Module, list[int]]:
    """(forward ONNX graph, the traced copy of the base model, class count of every head).

    The graph takes the example inputs' names (dim 0 dynamic, and dim 1 of integer rank-2
    mapping inputs) [+ `task_id`], returns `logits`, and names its initializers like the
    base model's parameters.
    """
    g = _device_graph(model, example_inputs, future_heads, _MultiHeadGraph)
    dynamic = {n: {0: "batch"} for n in g.names}
    for n, t in zip(g.names, g.tensors):
        if g.by_keyword and t.dim() == 2 and not t.is_floating_point():
            dynamic[n][1] = "sequence"
    dynamic["logits"] = {0: "batch"}
    forward = _trace(g.module, g.args, g.input_names, dynamic, opset)
    _strip_prefix(forward, _PREFIX)
    head_classes = g.head_classes or [
        forward.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    ]
    return forward, g.net, head_classes


def _check_exportable(model: Any) -> None:
    if not hasattr(model, "softmask_config") or not hasattr(model, "store"):
        raise InputTypeError(f"model must be a SoftMaskModel, got {type(model).__name__}")
    cfg = model.softmask_config
    if cfg.method != "spg":
        raise ConfigError(
            f"device export supports parameter-level importance (method='spg'), got {cfg.method!r}"
        )
    if getattr(model, "lora_subspace", None) is not None:
        raise ConfigError(
            "device export carries element-wise importance; the LoRA subspace mask (the fold, "
            "the projection of A) has no device learner: export the merged model "
            "(softmask_peft.merge.save_merged) wrapped with SoftMaskConfig(lora_mask='factors')"
        )
    if model.current_task is not None:
        raise TaskOrderError(
            f"task {model.current_task} is still open: call end_task() before exporting"
        )


def _roles(model: Any, net: nn.Module, multi_head: bool) -> dict[str, Any]:
    """Parameter roles, importance and history of `net` (the exported copy), as numpy."""
    cfg = model.softmask_config
    masked, heads = select_parameters(net, cfg)
    params = dict(net.named_parameters())

    def of(tensors: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
        return {
            n: tensors[n].detach().cpu().numpy()
            if n in tensors
            else np.zeros(tuple(params[n].shape), np.float32)
            for n in masked
        }

    return {
        "trainable": [n for n, p in params.items() if p.requires_grad],
        "masked": masked,
        "heads": heads,
        "task_mode": "task_incremental" if multi_head else "shared_head",
        "importance": of(model.parameter_importance()),
        "history": [of(t) for t in model.store.history],
        "task_names": [t.name for t in model.task_log],
        "versions": _versions(),
        "scale_heads": not (multi_head and cfg.head_scaling == "except_new"),
        "capacity": {
            "sharpness": cfg.importance_sharpness,
            "budget": cfg.importance_budget,
            "decay": cfg.importance_decay,
            "cross_heads": cfg.method_config.cross_heads,
        },
    }


def export_for_device(
    model: Any,
    example_inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    directory: str | os.PathLike,
    *,
    loss: str = "cross_entropy",
    optimizer: str = "sgd",
    future_heads: Sequence[int] = (),
    importance_dtype: str | None = None,
    opset: int = 17,
    runtime: str = "onnxruntime",
    max_batch: int = 256,
    xnnpack: bool = True,
) -> Manifest:
    """Write device artifacts for `model` into `directory`; return the manifest.

    Args:
        example_inputs: one batch of model inputs (no labels); dim 0 is exported as dynamic,
            and dim 1 of integer rank-2 mapping inputs (token ids, masks) too (ONNX only).
        loss: "cross_entropy" (the task loss; SPG's cross-head term is built in).
        optimizer: "sgd" (plain, as the official SPG) or "adamw" (betas 0.9/0.999, eps 1e-8,
            no weight decay, so a parameter with importance 1 stays exactly unchanged);
            ExecuTorch: "sgd" only (momentum is an `EdgeLearner` option there).
        future_heads: class counts of heads added now for tasks the device will learn
            (task-incremental models only).
        importance_dtype: storage of A in the checkpoint; default the config's.
        runtime: "onnxruntime" (ONNX Runtime Training graphs) or "executorch" (ExecuTorch
            programs: the `executorch` package, see docs/guides/executorch.md).
        max_batch: ExecuTorch plans its memory for batches of at most this many rows.
        xnnpack: ExecuTorch: delegate the supported subgraphs (the matmuls of the forward and
            backward, reading the weights at every run) to XNNPACK; False: the portable
            kernels only (4-25x slower, bench/executorch_step.py measures it).
    """
    if runtime not in ("onnxruntime", "executorch"):
        raise ConfigError(f"runtime must be 'onnxruntime' or 'executorch', got {runtime!r}")
    _check_exportable(model)
    cfg = model.softmask_config
    dtype = importance_dtype or cfg.importance_dtype
    if runtime == "executorch":
        return _export_executorch(
            model, example_inputs, directory, optimizer, future_heads, dtype, max_batch, loss, xnnpack
        )
    from softmask_edge import build_artifacts  # the optional `onnx` extra: only when exporting

    forward, net, head_classes = _forward_graph(model, example_inputs, future_heads, opset)
    return build_artifacts(
        forward,
        directory,
        head_classes=head_classes,
        importance_dtype=dtype,
        loss=loss,
        optimizer=optimizer,
        **_roles(model, net, isinstance(net, MultiHeadClassifier)),
    )


def _export_executorch(
    model: Any,
    example_inputs: Any,
    directory: str | os.PathLike,
    optimizer: str,
    future_heads: Sequence[int],
    importance_dtype: str,
    max_batch: int,
    loss: str,
    xnnpack: bool,
) -> Manifest:
    """ExecuTorch programs (`executorch_export`) + the shared device files (`softmask_edge`)."""
    from softmask_edge.executorch_builder import build_executorch_artifacts
    from softmask_edge.manifest import InputSpec

    from .executorch_export import ProgramMultiHeadGraph, build_programs

    if loss != "cross_entropy":
        raise ConfigError(f"loss must be 'cross_entropy', got {loss!r}")
    if optimizer != "sgd":
        raise ConfigError(
            f"the ExecuTorch runtime's optimizer is SGD (momentum, weight decay, Nesterov), got "
            f"{optimizer!r}: AdamW would need its moments outside the program; use "
            "runtime='onnxruntime' for AdamW on a device"
        )
    g = _device_graph(model, example_inputs, future_heads, ProgramMultiHeadGraph)
    _drop_zero_dropout(g.net)
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in g.net.modules()):
        warnings.warn(
            "the model has dropout: ExecuTorch's dropout kernel draws from its own generator, "
            "which EdgeLearner's seed does not reach, so device runs are not reproducible "
            "(the ONNX Runtime learner's are); soft-masking and the importance pass are unchanged",
            UserWarning,
            stacklevel=3,
        )
    roles = _roles(model, g.net, g.multi_head)
    head_classes = g.head_classes
    if head_classes is None:
        with torch.no_grad():
            head_classes = [int(g.module(*g.args).shape[-1])]
    programs = build_programs(
        g.module, g.args, len(g.names), roles["trainable"], roles["masked"], max_batch, xnnpack
    )
    params = dict(g.net.named_parameters())
    return build_executorch_artifacts(
        directory,
        programs=programs,
        weights={n: params[n].detach().cpu().numpy().copy() for n in roles["trainable"]},
        head_classes=head_classes,
        inputs=[
            InputSpec(n, str(t.detach().cpu().numpy().dtype), [None, *t.shape[1:]])
            for n, t in zip(g.names, g.tensors)
        ],
        importance_dtype=importance_dtype,
        optimizer=optimizer,
        **roles,
    )


@dataclass
class DeviceState:
    """What a device learned, as torch tensors: `SoftMaskModel.load_device_state` applies it."""

    source: str
    weights: dict[str, Tensor]
    accumulated: dict[str, Tensor]
    history: list[dict[str, Tensor]]
    tasks: list[TaskRecord]
    masked: list[str]


def read_device_checkpoint(directory: str | os.PathLike) -> DeviceState:
    """Read (and let `softmask_edge` validate) a device's artifacts folder; change nothing."""
    from softmask_edge import read_device_checkpoint as read_edge  # the optional `onnx` extra

    ckpt = read_edge(directory)
    m = ckpt.manifest
    tasks = [
        TaskRecord(
            m.task_names[k] if k < len(m.task_names) else f"task_{k}",
            m.task_classes(k) if m.task_mode == "task_incremental" else None,
        )
        for k in range(m.num_tasks)
    ]
    return DeviceState(
        source=str(directory),
        weights={n: torch.from_numpy(a) for n, a in ckpt.weights.items()},
        accumulated={n: torch.from_numpy(a) for n, a in ckpt.importance.items()},
        history=[{n: torch.from_numpy(a) for n, a in t.items()} for t in ckpt.history],
        tasks=tasks,
        masked=list(m.masked),
    )


def device_state_problems(model: Any, state: DeviceState, shapes: dict[str, tuple]) -> list[str]:
    """Everything that keeps a device state from replacing `model`'s weights and store.

    `model` is the `SoftMaskModel` (its `load_device_state` calls this before changing
    anything); `shapes` are its parameters' shapes with the heads the device learned added.
    """
    problems = [f"the model has no parameter {n!r}" for n in state.masked if n not in shapes]
    problems += [f"checkpoint lacks {n!r}" for n in sorted(set(shapes) - set(state.weights))]
    problems += [
        f"{n}: device shape {tuple(state.weights[n].shape)} != model {shapes[n]}"
        for n in sorted(set(shapes) & set(state.weights))
        if tuple(state.weights[n].shape) != shapes[n]
    ]
    for k, task in enumerate([state.accumulated, *state.history]):
        what = "accumulated importance" if k == 0 else f"importance of task {k - 1}"
        problems += [
            f"{what} of {n!r}: {problem}"
            for n, a in sorted(task.items())
            if (problem := importance_problem(a, shapes.get(n)))
        ]
    if set(state.masked) != set(model.masked_parameter_names):
        problems.append(
            f"masked parameters differ: device {sorted(state.masked)} vs model "
            f"{sorted(model.masked_parameter_names)}"
        )
    ours, theirs = model.store.tasks[: model.num_tasks], state.tasks[: len(state.history)]
    if len(theirs) < len(ours):
        problems.append(
            f"the device learned {len(theirs)} task(s) and the model {len(ours)}: the device "
            "checkpoint is behind this model (loading it would drop tasks); export again"
        )
    elif [t.name for t in theirs[: len(ours)]] != [t.name for t in ours]:
        problems.append(
            f"the device's task log {[t.name for t in theirs]} diverges from the model's "
            f"{[t.name for t in ours]}: it was exported from another run"
        )
    if model.store.open_task is not None:
        problems.append(f"task {model.store.open_task} is open on the model: end_task() first")
    return problems


def load_device_checkpoint(model: Any, directory: str | os.PathLike) -> Any:
    """Restore what a device learned (weights, accumulated and per-task importance) into `model`.

    Everything is checked before anything changes: the masked parameters must be the
    manifest's, every weight the model has must be in the checkpoint with its shape, and the
    device's task log must extend the model's (a device behind the model, or exported from
    another run, is refused). A `MultiHeadClassifier` gains the heads of the tasks the device
    learned; declared heads the device never trained are not added.
    """
    model.load_device_state(read_device_checkpoint(directory))
    return model
