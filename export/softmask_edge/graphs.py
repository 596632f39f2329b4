"""Build-time ONNX graph surgery on the exported training graphs. numpy + onnx only.

The codec nodes and the importance-update graph live in `importance_graph`, what a learner
does to the graphs it loads (specialize, learning rate, token-id bounds) in `session_graphs`.

* `add_gradient_outputs`: torch exports LayerNormalization, MaxPool and Dropout without the
  optional outputs (mean / inv_std_dev, indices, mask) their ORT gradients read.
* `add_classification_loss`: loss = (1 - c) · CE(logits, labels) + c · Σ logits, with the
  scalar input c = `softmask_cross_head` (0 training, 1 SPG's cross-head term for an earlier head).
* `insert_masking`: `Mul(P_grad, keep_P)` before each `InPlaceAccumulatorV2`, with
  keep_P = 1 − s · A_P for masked parameters and 1 − s · ā for heads, s = `softmask_scale`.
* `expose_gradients`, `record_learning_rate`: what runtimes without the Python API need
  (onnxruntime-web cannot fetch gradients by name nor set the learning rate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .importance_graph import (
    NAME_PREFIX,
    STORAGE_TYPES,
    add_codec_constants,
    constant,
    decode_nodes,
)
from .manifest import (
    CROSS_HEAD_INPUT,
    GRADIENT_SUFFIX,
    IMPORTANCE_SUFFIX,
    LABELS_INPUT,
    LEARNING_RATE_INITIALIZER,
    LOGITS_OUTPUT,
    LOSS_OUTPUT,
    MEAN_IMPORTANCE,
    SCALE_INPUT,
)

# outputs ORT's gradient builders read but torch's exporter leaves out
_GRADIENT_OUTPUTS = {
    "LayerNormalization": ("mean", "inv_std_dev"),
    "MaxPool": ("indices",),
    "Dropout": ("mask",),
}


def add_gradient_outputs(model: onnx.ModelProto) -> int:
    """Give nodes the optional outputs their ORT gradient needs; return how many were fixed.

    torch exports LayerNormalization with one output (ORT needs Mean and InvStdDev),
    MaxPool without Indices and Dropout without its mask.
    """
    fixed = 0
    for i, node in enumerate(model.graph.node):
        extra = _GRADIENT_OUTPUTS.get(node.op_type, ())
        if extra and len(node.output) == 1:
            node.output.extend(f"{NAME_PREFIX}{node.op_type}{i}.{name}" for name in extra)
            fixed += 1
    return fixed


def add_classification_loss(model: onnx.ModelProto) -> None:
    """Append the loss, make (loss, logits) the outputs; adds the `labels` and cross-head inputs."""
    g = model.graph
    names = [o.name for o in g.output]
    if names != [LOGITS_OUTPUT]:
        raise ValueError(
            f"the forward graph must have the single output {LOGITS_OUTPUT!r}, got {names}"
        )
    logits = g.output[0]
    batch = logits.type.tensor_type.shape.dim[0]
    labels = helper.make_tensor_value_info(LABELS_INPUT, TensorProto.INT64, [None])
    labels.type.tensor_type.shape.dim[0].CopyFrom(batch)
    g.input.extend([labels, helper.make_tensor_value_info(CROSS_HEAD_INPUT, TensorProto.FLOAT, [])])
    one = constant(g, NAME_PREFIX + "one", 1.0)
    p = NAME_PREFIX
    g.node.extend(
        [
            helper.make_node(
                "SoftmaxCrossEntropyLoss",
                [LOGITS_OUTPUT, LABELS_INPUT],
                [p + "ce", p + "log_prob"],
                reduction="mean",
            ),
            helper.make_node("ReduceSum", [LOGITS_OUTPUT], [p + "logit_sum"], keepdims=0),
            helper.make_node("Sub", [one, CROSS_HEAD_INPUT], [p + "ce_weight"]),
            helper.make_node("Mul", [p + "ce", p + "ce_weight"], [p + "ce_part"]),
            helper.make_node("Mul", [p + "logit_sum", CROSS_HEAD_INPUT], [p + "sum_part"]),
            helper.make_node("Add", [p + "ce_part", p + "sum_part"], [LOSS_OUTPUT]),
        ]
    )
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info(LOSS_OUTPUT, TensorProto.FLOAT, []), logits])


def _importance_inputs(
    shapes: Mapping[str, Sequence[int]], dtype: str
) -> list[onnx.ValueInfoProto]:
    """The stored A of every masked parameter and the scalar ā (checkpoint parameters)."""
    return [
        *(
            helper.make_tensor_value_info(
                name + IMPORTANCE_SUFFIX, STORAGE_TYPES[dtype], list(shape)
            )
            for name, shape in shapes.items()
        ),
        helper.make_tensor_value_info(MEAN_IMPORTANCE, TensorProto.FLOAT, [1]),
    ]


def insert_masking(
    model: onnx.ModelProto,
    masked_shapes: Mapping[str, Sequence[int]],
    heads: Sequence[str],
    dtype: str,
) -> None:
    """Scale every accumulated gradient: masked P by 1 − s·A_P, heads by 1 − s·ā.

    s = `softmask_scale` is the only new user input (1 to train, 0 for the raw-gradient
    importance pass). ā, the element-weighted mean of A over all masked parameters, is the
    checkpoint scalar `softmask.mean_importance`, rewritten by the importance-update graph
    whenever A changes. As written, a step computes keep (storage decode, Mul, Sub) and masks
    (Mul) per masked tensor; the learners run it through `specialize`, which leaves one Mul.
    """
    g = model.graph
    input_names = [i.name for i in g.input]
    missing = [n for n in (*masked_shapes, *heads) if n not in input_names]
    if missing:
        raise ValueError(f"parameters not found in the training graph: {missing}")
    first_param = min(input_names.index(n) for n in masked_shapes)
    g.input.insert(first_param, helper.make_tensor_value_info(SCALE_INPUT, TensorProto.FLOAT, []))
    g.input.extend(_importance_inputs(masked_shapes, dtype))
    p = NAME_PREFIX
    one = constant(g, p + "one.mask", 1.0)
    add_codec_constants(g)
    prelude: list[onnx.NodeProto] = []
    keep: dict[str, str] = {}
    for name in masked_shapes:
        a = name + IMPORTANCE_SUFFIX
        if dtype != "float32":
            prelude += decode_nodes(a, p + name + ".A", dtype)
            a = p + name + ".A"
        prelude += [
            helper.make_node("Mul", [a, SCALE_INPUT], [p + name + ".scaled"]),
            helper.make_node("Sub", [one, p + name + ".scaled"], [p + name + ".keep"]),
        ]
        keep[name] = p + name + ".keep"
    if heads:
        prelude += [
            helper.make_node("Mul", [MEAN_IMPORTANCE, SCALE_INPUT], [p + "head_scaled"]),
            helper.make_node("Sub", [one, p + "head_scaled"], [p + "head_keep"]),
        ]
        keep.update({h: p + "head_keep" for h in heads})
    nodes: list[onnx.NodeProto] = list(prelude)
    for node in g.node:
        if node.op_type == "InPlaceAccumulatorV2":
            grad = node.input[1]
            param = grad.removesuffix("_grad")
            if param in keep:
                nodes.append(helper.make_node("Mul", [grad, keep[param]], [grad + ".masked"]))
                node.input[1] = grad + ".masked"
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)


def expose_gradients(model: onnx.ModelProto) -> list[str]:
    """Make each parameter's accumulated gradient a graph output `P + GRADIENT_SUFFIX`.

    The gradient buffers live in the checkpoint state, which onnxruntime-web cannot read by
    name; the second (optional, aliased) output of `InPlaceAccumulatorV2` is the buffer after
    accumulation. Python's Module returns the extra outputs after (loss, logits).
    """
    g = model.graph
    names = []
    for node in g.node:
        if node.op_type == "InPlaceAccumulatorV2" and len(node.output) == 1:
            param = node.input[1].removesuffix(".masked").removesuffix("_grad")
            node.output.append(param + GRADIENT_SUFFIX)
            names.append(param)
    shapes = {i.name: i.type.tensor_type for i in g.input}
    for param in names:
        out = g.output.add()
        out.name = param + GRADIENT_SUFFIX
        out.type.tensor_type.CopyFrom(shapes[param])
    return names


def record_learning_rate(model: onnx.ModelProto, lr: float) -> None:
    """Feed the optimizer node's lr from the initializer `LEARNING_RATE_INITIALIZER`.

    onnxruntime-web has no call to set the learning rate (its optimizer always feeds ORT's
    default 0.001 to the `learning_rate` input), so the input stays declared but unused and
    a learner writes the task's lr into the initializer before creating the optimizer. Also
    declares SGDOptimizerV2's flag output with rank 0: onnxruntime-web refuses the graph
    (a bare numeric exception) with the rank-1 declaration onnxblock writes.
    """
    g = model.graph
    g.initializer.append(
        numpy_helper.from_array(np.array([lr], np.float32), LEARNING_RATE_INITIALIZER)
    )
    for node in g.node:
        if node.op_type in ("SGDOptimizerV2", "AdamWOptimizer"):
            node.input[0] = LEARNING_RATE_INITIALIZER
            for out in g.output:
                if node.op_type == "SGDOptimizerV2" and out.name == node.output[0]:
                    del out.type.tensor_type.shape.dim[:]


def add_importance_inputs(
    model: onnx.ModelProto, masked_shapes: Mapping[str, Sequence[int]], dtype: str
) -> None:
    """The eval graph is fed every checkpoint parameter, so it must declare the importance too."""
    model.graph.input.extend(_importance_inputs(masked_shapes, dtype))
