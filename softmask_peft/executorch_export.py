"""ExecuTorch programs for device training: the masked step, the eval step (torch side).

The training program is the model wrapped in a loss, captured with `torch.export`, turned
into a joint forward + backward graph (`torch.export.experimental._export_forward_backward`)
and lowered with `executorch.exir`; its weights live in a separate `.ptd`. Soft-masking is
inside the graph with keep tensors as inputs, so a new task needs new inputs, not a new
program: every trainable P is used as

    P̃ = P.detach() + keep_P · (P − P.detach())     (value P, gradient keep_P · ∂L/∂P̃)

keep_P = 1 − A_P for masked P, 1 − ā for heads (1 with head_scaling="except_new"), 1
otherwise; keep = 1 everywhere is SPG's raw-gradient importance pass. The loss is
(1 − c)·CE(logits, labels) + c·Σ logits with the cross-head scalar c (SPG's term for earlier
heads), as in the ONNX graphs. The eval program takes the weights as inputs, so it always
sees the training program's current weights without a copy into another program.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from softmask_edge.manifest import (
    EVAL_PROGRAM_NAME,
    INFERENCE_PROGRAM_NAME,
    TRAINING_DATA_NAME,
    TRAINING_PROGRAM_NAME,
)
from torch import Tensor, nn

from .errors import ConfigError

PAD_LOGIT = -1e4
# backward kernels of executorch 1.5.1's portable library that give wrong gradients or crash
# (measured against torch: max-pool backward gives gradients off by ~1e2 or a segfault)
BROKEN_BACKWARD_OPS = ("max_pool2d_with_indices_backward", "avg_pool2d_backward")


class ProgramMultiHeadGraph(nn.Module):
    """features -> every head (padded to `width`) -> stacked -> the `task_id` one.

    The same logits as `device._MultiHeadGraph`, written with `cat` and `index_select`:
    `F.pad` and tensor indexing make the joint graph specialize the batch dimension.
    """

    def __init__(self, net: nn.Module, width: int) -> None:
        super().__init__()
        self.net = net
        self.width = width

    def forward(self, x: Tensor, task_id: Tensor) -> Tensor:
        z = self.net.features(x)
        logits = []
        for h in self.net.heads:
            out = h(z)
            if h.out_features < self.width:
                pad = torch.full_like(out[:, :1], PAD_LOGIT).expand(-1, self.width - h.out_features)
                out = torch.cat([out, pad], dim=1)
            logits.append(out)
        return torch.index_select(torch.stack(logits), 0, task_id.reshape(1)).squeeze(0)


def _loss(logits: Tensor, labels: Tensor, cross_head: Tensor) -> Tensor:
    return (1 - cross_head) * F.cross_entropy(logits, labels) + cross_head * logits.sum()


class _TrainStep(nn.Module):
    """(*inputs, labels, cross_head, keeps) -> (loss, logits), gradients scaled by keep."""

    def __init__(self, graph: nn.Module, trainable: Sequence[str], num_inputs: int) -> None:
        super().__init__()
        self.model = graph  # parameters: model.net.P (manifest.PROGRAM_PARAMETER_PREFIX)
        self.trainable = list(trainable)
        self.num_inputs = num_inputs

    def forward(self, *args: Tensor) -> tuple[Tensor, Tensor]:
        *inputs, labels, cross_head, keeps = args
        params = dict(self.model.net.named_parameters())
        masked = {
            "net." + n: params[n].detach() + k * (params[n] - params[n].detach())
            for n, k in zip(self.trainable, keeps)
        }
        logits = torch.func.functional_call(self.model, masked, tuple(inputs))
        return _loss(logits, labels, cross_head), logits.detach()


class _Logits(nn.Module):
    """(*inputs) -> logits: the inference program (eval mode), weights named `model.net.P`."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.model = graph

    def forward(self, *args: Tensor) -> Tensor:
        return self.model(*args)


class _EvalStep(nn.Module):
    """(*inputs, labels, weights) -> (loss, logits) with the given weights, eval mode."""

    def __init__(self, graph: nn.Module, trainable: Sequence[str]) -> None:
        super().__init__()
        self.model = graph
        self.trainable = list(trainable)

    def forward(self, *args: Tensor) -> tuple[Tensor, Tensor]:
        *inputs, labels, weights = args
        given = {"net." + n: w for n, w in zip(self.trainable, weights)}
        logits = torch.func.functional_call(self.model, given, tuple(inputs))
        return F.cross_entropy(logits, labels), logits


def _lower(
    program, external_weights: bool = False, external_constants: bool = False, xnnpack: bool = False
):
    """exported program -> ExecuTorch program (bounded dynamic shapes planned at the bound);
    trainable weights (mutable) or constant weights (inference) in a separate .ptd;
    `xnnpack`: the subgraphs XNNPACK supports run delegated (forward and backward matmuls)."""
    from executorch.exir import (
        EdgeCompileConfig,
        ExecutorchBackendConfig,
        to_edge_transform_and_lower,
    )
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    partitioners = []
    if xnnpack:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        # the training program's weights are its mutable inputs: XNNPACK must read them at
        # every run instead of packing them once (else it leaves every matmul to the portable
        # kernels, 5-25x torch's time)
        partitioners.append(XnnpackPartitioner(force_non_static_weights_for_f32_linear=True))
    try:
        edge = to_edge_transform_and_lower(
            program,
            partitioner=partitioners,
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
    except RuntimeError as e:
        if not xnnpack:
            raise
        raise ConfigError(
            f"XNNPACK could not delegate this model's program ({e}); export with xnnpack=False "
            "(the portable kernels: slower, same results)"
        ) from e
    return edge.to_executorch(
        config=ExecutorchBackendConfig(
            external_mutable_weights=external_weights,
            external_constants=external_constants,
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        )
    )


def build_programs(
    graph: nn.Module,
    args: tuple[Tensor, ...],
    num_inputs: int,
    trainable: Sequence[str],
    masked: Sequence[str],
    max_batch: int,
    xnnpack: bool = False,
) -> dict[str, bytes]:
    """{file name: bytes} of the training program, its weights (.ptd), the eval program and
    the inference program (weights external, keyed `model.net.P`).

    `graph(*args)` gives the logits; the first `num_inputs` args are batched (dim 0 becomes
    a dynamic dimension of at most `max_batch` rows), the rest is the task id. `xnnpack`
    delegates what XNNPACK supports in every program (training parity checked in the tests).
    """
    try:
        from torch.export import Dim, export
        from torch.export.experimental import _export_forward_backward
    except ImportError as e:  # pragma: no cover - torch too old
        raise ConfigError(f"ExecuTorch export needs torch.export: {e}") from e
    try:
        import executorch  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "runtime='executorch' needs the executorch package (pip install executorch==1.5.1)"
        ) from e
    if not (isinstance(max_batch, int) and max_batch >= 2):
        raise ConfigError(f"max_batch must be an int >= 2, got {max_batch!r}")
    buffers = [n for n, _ in graph.named_buffers()]
    if buffers:
        raise ConfigError(
            f"ExecuTorch export: buffers {buffers[:3]} (e.g. BatchNorm statistics) would be "
            "program constants the device cannot update or save; use runtime='onnxruntime'"
        )
    params = dict(graph.net.named_parameters())
    batch = Dim("batch", min=1, max=max_batch)
    inputs, rest = args[:num_inputs], args[num_inputs:]
    if int(inputs[0].shape[0]) < 1:
        raise ConfigError("the example inputs need at least one row")
    # torch.export specialises a dimension of size 1 to the constant 1 (no dynamic batch):
    # trace with the example's first row twice; only the shapes matter here
    inputs = tuple(x if x.shape[0] > 1 else torch.cat([x[:1], x[:1]]) for x in inputs)
    args = (*inputs, *rest)
    size = int(inputs[0].shape[0])
    labels = torch.zeros(size, dtype=torch.int64)
    in_shapes = [{0: batch} for _ in inputs] + [None for _ in rest]
    keeps = [
        torch.ones_like(params[n]) if n in set(masked) else torch.ones(1) for n in trainable
    ]
    step = _TrainStep(graph, trainable, num_inputs).train()
    train_args = (*inputs, *rest, labels, torch.tensor(0.0), keeps)
    shapes = (*in_shapes, {0: batch}, None, [None] * len(keeps))
    try:
        traced = export(step, train_args, dynamic_shapes=(shapes,), strict=False)
    except Exception as e:  # torch.export's own errors (UserError, constraint violations, ...)
        raise ConfigError(
            f"ExecuTorch export: torch.export could not trace this model's training step "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}); "
            "runtime='onnxruntime' traces with torch.onnx instead"
        ) from e
    joint = _export_forward_backward(traced)
    broken = sorted(
        {
            str(node.target)
            for node in joint.graph.nodes
            if node.op == "call_function" and any(op in str(node.target) for op in BROKEN_BACKWARD_OPS)
        }
    )
    if broken:
        raise ConfigError(
            f"ExecuTorch export: the training graph needs {broken}, whose ExecuTorch kernels "
            "give wrong gradients (executorch 1.5.1); use runtime='onnxruntime' for this model, "
            "or a model without pooling"
        )
    training = _lower(joint, external_weights=True, xnnpack=xnnpack)

    evaluation = _EvalStep(graph, trainable).eval()
    weights = [params[n].detach().clone() for n in trainable]
    eval_args = (*inputs, *rest, labels, weights)
    eval_shapes = (*in_shapes, {0: batch}, [None] * len(weights))
    with torch.no_grad():
        evaluation = _lower(
            export(evaluation, eval_args, dynamic_shapes=(eval_shapes,), strict=False),
            xnnpack=xnnpack,
        )
        inference = _lower(  # portable kernels: its weights are rewritten after learning,
            # and XNNPACK would pack a convolution's into its own blob (then stale)
            export(_Logits(graph).eval(), args, dynamic_shapes=(tuple(in_shapes),), strict=False),
            external_constants=True,
        )
    graph.train()
    with tempfile.TemporaryDirectory(prefix="softmask_executorch.") as tmp:
        training.write_tensor_data_to_file(tmp)
        (data,) = Path(tmp).glob("*.ptd")
        ptd = data.read_bytes()
    return {
        TRAINING_PROGRAM_NAME: training.buffer,
        TRAINING_DATA_NAME: ptd,
        EVAL_PROGRAM_NAME: evaluation.buffer,
        INFERENCE_PROGRAM_NAME: inference.buffer,
    }


__all__ = ["ProgramMultiHeadGraph", "build_programs"]
