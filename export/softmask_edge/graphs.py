"""ONNX graph surgery and the importance-update graph. numpy + onnx only.

* `add_gradient_outputs`: torch exports LayerNormalization, MaxPool and Dropout without the
  optional outputs (mean / inv_std_dev, indices, mask) their ORT gradients read.
* `add_classification_loss`: loss = (1 - c) · CE(logits, labels) + c · Σ logits, with the
  scalar input c = `softmask_cross_head` (0 training, 1 SPG's cross-head term for an earlier head).
* `insert_masking`: `Mul(P_grad, keep_P)` before each `InPlaceAccumulatorV2`, with
  keep_P = 1 − s · A_P for masked parameters and 1 − s · ā for heads, s = `softmask_scale`.
* `expose_gradients`, `record_learning_rate`: what runtimes without the Python API need
  (onnxruntime-web cannot fetch gradients by name nor set the learning rate).
* `specialize`: the graphs one training session runs, with s, A and ā as constants.
* `index_bounds`: the row count of the table each integer input indexes (token ids).
* `importance_update_model`: γ = max_h |tanh(standardize(g_h))|, A' = max(A, γ).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from softmask_format import codec

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

IMPORTANCE_OPSET = 17
# float16 importance travels as its IEEE-754 bit pattern in a uint16 tensor: ORT 1.19 cannot
# load float16 tensors from a checkpoint ("Unsupported data type: 10"), uint16 it can.
STORAGE_TYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.UINT16,
    "uint8": TensorProto.UINT8,
}
_PREFIX = "softmask/"
_CODEC_CONSTANTS = {  # from softmask_format.codec, so graph and numpy decode alike
    "uint8_table": codec.UINT8_DECODE_TABLE,
    # boundaries with a floor below 0 and a ceiling above 1: code c iff lo[c] <= A < lo[c + 1]
    "uint8_bounds": np.concatenate([[-1.0], codec.UINT8_BOUNDARIES, [2.0]]),
    "uint8_log_scale": -codec.UINT8_STEPS_PER_OCTAVE / np.log(2.0),
    "half": 0.5,
    "uint8_max": float(codec.UINT8_ZERO_KEEP),
    "c1024": 2.0**codec.FLOAT16_MANTISSA_BITS,
    "c15": float(codec.FLOAT16_EXPONENT_BIAS),
    "two": 2.0,
    "codec_one": 1.0,
    "codec_zero": 0.0,
    "min_normal": codec.FLOAT16_MIN_NORMAL,
    "subnormal_unit": codec.FLOAT16_SUBNORMAL_UNIT,
    "subnormal_scale": 1.0 / codec.FLOAT16_SUBNORMAL_UNIT,
    "inv_ln2": 1.0 / np.log(2.0),
}


def _const(
    graph: onnx.GraphProto, name: str, value: float | Sequence[int] | np.ndarray, dtype=np.float32
) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
    return name


def add_codec_constants(graph: onnx.GraphProto) -> None:
    """The constants `decode_nodes` / `encode_nodes` refer to (once per graph)."""
    for name, value in _CODEC_CONSTANTS.items():
        _const(graph, _PREFIX + name, value)
    _const(graph, _PREFIX + "int_one", 1, np.int64)


def decode_nodes(stored: str, out: str, dtype: str) -> list[onnx.NodeProto]:
    """Stored importance -> float32 (as softmask_format.codec.decode).

    uint8: A = the codec's table at the code (1 − 2^(−c/16), 255 -> 1). float16 bits b (A in
    [0, 1], sign 0): e = ⌊b / 1024⌋, m = b − 1024 e, A = m · 2^-24 if e = 0 else
    (1 + m / 1024) · 2^(e − 15), all exact in float32.
    """
    c = _PREFIX
    if dtype == "float32":
        return [helper.make_node("Identity", [stored], [out])]
    if dtype == "uint8":
        return [
            helper.make_node("Cast", [stored], [out + ".idx"], to=TensorProto.INT64),
            helper.make_node("Gather", [c + "uint8_table", out + ".idx"], [out]),
        ]
    t = out + ".f16"
    return [
        helper.make_node("Cast", [stored], [t + ".bits"], to=TensorProto.FLOAT),
        helper.make_node("Div", [t + ".bits", c + "c1024"], [t + ".eq"]),
        helper.make_node("Floor", [t + ".eq"], [t + ".e"]),
        helper.make_node("Mul", [t + ".e", c + "c1024"], [t + ".e1024"]),
        helper.make_node("Sub", [t + ".bits", t + ".e1024"], [t + ".m"]),
        helper.make_node("Div", [t + ".m", c + "c1024"], [t + ".frac"]),
        helper.make_node("Add", [t + ".frac", c + "codec_one"], [t + ".sig"]),
        helper.make_node("Sub", [t + ".e", c + "c15"], [t + ".exp"]),
        helper.make_node("Pow", [c + "two", t + ".exp"], [t + ".scale"]),
        helper.make_node("Mul", [t + ".sig", t + ".scale"], [t + ".normal"]),
        helper.make_node("Mul", [t + ".m", c + "subnormal_unit"], [t + ".sub"]),
        helper.make_node("Equal", [t + ".e", c + "codec_zero"], [t + ".is_sub"]),
        helper.make_node("Where", [t + ".is_sub", t + ".sub", t + ".normal"], [out]),
    ]


def encode_nodes(value: str, out: str, dtype: str) -> list[onnx.NodeProto]:
    """float32 importance in [0, 1] -> stored: uint8 log-keep code; float16 bits of A.

    uint8: the estimate c0 = clip(⌊−16 · log2(1 − A) + 1/2⌋, 0, 255), moved by one where A lies
    outside [lo[c0], lo[c0 + 1]) of the codec's boundaries, so the code is the numpy codec's
    (the log only has to be right to within one code). float16: h = A rounded to float16 (a Cast pair, round-to-nearest-even); subnormal h gives
    b = h · 2^24; else e = ⌊log2 h⌋ (corrected by one where the log rounds across a power of
    two) and b = 1024 (e + 15) + 1024 (h / 2^e − 1).
    """
    c = _PREFIX
    if dtype == "float32":
        return [helper.make_node("Identity", [value], [out])]
    if dtype == "uint8":
        t = out + ".u8"
        a = t + ".a"  # clipped: ORT's Tanh can return 1 + 1 ulp, whose keep has no log
        return [
            helper.make_node("Clip", [value, c + "codec_zero", c + "codec_one"], [a]),
            helper.make_node("Sub", [c + "codec_one", a], [t + ".keep"]),
            helper.make_node("Log", [t + ".keep"], [t + ".ln"]),
            helper.make_node("Mul", [t + ".ln", c + "uint8_log_scale"], [t + ".steps"]),
            helper.make_node("Add", [t + ".steps", c + "half"], [t + ".shifted"]),
            helper.make_node("Floor", [t + ".shifted"], [t + ".rounded"]),
            helper.make_node(
                "Clip", [t + ".rounded", c + "codec_zero", c + "uint8_max"], [t + ".est_f"]
            ),
            helper.make_node("Cast", [t + ".est_f"], [t + ".est"], to=TensorProto.INT64),
            helper.make_node("Add", [t + ".est", c + "int_one"], [t + ".next"]),
            helper.make_node("Gather", [c + "uint8_bounds", t + ".est"], [t + ".lo"]),
            helper.make_node("Gather", [c + "uint8_bounds", t + ".next"], [t + ".hi"]),
            helper.make_node("Less", [a, t + ".lo"], [t + ".below"]),
            helper.make_node("GreaterOrEqual", [a, t + ".hi"], [t + ".above"]),
            helper.make_node("Cast", [t + ".below"], [t + ".down"], to=TensorProto.INT64),
            helper.make_node("Cast", [t + ".above"], [t + ".up"], to=TensorProto.INT64),
            helper.make_node("Sub", [t + ".est", t + ".down"], [t + ".est_d"]),
            helper.make_node("Add", [t + ".est_d", t + ".up"], [t + ".code"]),
            helper.make_node("Cast", [t + ".code"], [out], to=TensorProto.UINT8),
        ]
    t = out + ".f16"
    return [
        helper.make_node("Cast", [value], [t + ".half"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", [t + ".half"], [t + ".h"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [t + ".h", c + "subnormal_scale"], [t + ".sub_bits"]),
        helper.make_node("Max", [t + ".h", c + "min_normal"], [t + ".safe"]),
        helper.make_node("Log", [t + ".safe"], [t + ".ln"]),
        helper.make_node("Mul", [t + ".ln", c + "inv_ln2"], [t + ".log2"]),
        helper.make_node("Floor", [t + ".log2"], [t + ".e0"]),
        helper.make_node("Pow", [c + "two", t + ".e0"], [t + ".p0"]),
        helper.make_node("Greater", [t + ".p0", t + ".safe"], [t + ".too_big"]),
        helper.make_node("Cast", [t + ".too_big"], [t + ".down"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [t + ".p0", c + "two"], [t + ".p0x2"]),
        helper.make_node("LessOrEqual", [t + ".p0x2", t + ".safe"], [t + ".too_small"]),
        helper.make_node("Cast", [t + ".too_small"], [t + ".up"], to=TensorProto.FLOAT),
        helper.make_node("Sub", [t + ".e0", t + ".down"], [t + ".e0d"]),
        helper.make_node("Add", [t + ".e0d", t + ".up"], [t + ".e"]),
        helper.make_node("Pow", [c + "two", t + ".e"], [t + ".p"]),
        helper.make_node("Div", [t + ".safe", t + ".p"], [t + ".sig"]),
        helper.make_node("Sub", [t + ".sig", c + "codec_one"], [t + ".frac"]),
        helper.make_node("Add", [t + ".e", c + "c15"], [t + ".biased"]),
        helper.make_node("Add", [t + ".biased", t + ".frac"], [t + ".fields"]),
        helper.make_node("Mul", [t + ".fields", c + "c1024"], [t + ".normal_bits"]),
        helper.make_node("Less", [t + ".h", c + "min_normal"], [t + ".is_sub"]),
        helper.make_node("Where", [t + ".is_sub", t + ".sub_bits", t + ".normal_bits"], [t + ".b"]),
        helper.make_node("Round", [t + ".b"], [t + ".rb"]),
        helper.make_node("Cast", [t + ".rb"], [out], to=TensorProto.UINT16),
    ]


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
            node.output.extend(f"{_PREFIX}{node.op_type}{i}.{name}" for name in extra)
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
    one = _const(g, _PREFIX + "one", 1.0)
    p = _PREFIX
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
    p = _PREFIX
    one = _const(g, p + "one.mask", 1.0)
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


def specialize(
    model: onnx.ModelProto,
    constants: Mapping[str, np.ndarray],
    unused: Sequence[str] = (),
    gradient_outputs: bool = True,
) -> onnx.ModelProto:
    """A copy of a session's graph: inputs in `constants` become constants, `unused` are dropped.

    A learner calls this when it opens a session, with s = `softmask_scale` (1 to learn,
    0 for the raw-gradient pass) and the stored A and ā as they are at that moment (they
    only change between tasks). ONNX Runtime then folds keep = 1 − s·decode(A) once, when the
    session is created, and every step runs one `Mul(P_grad, keep_P)` per masked tensor
    instead of the decode and the two scale nodes (uint8 storage: the table lookup over every
    element, each step). The artifacts' graph stays as written (hashed, and complete for
    runtimes that feed A themselves). The eval graph declares A and ā without reading them:
    ONNX Runtime feeds it the parameters the training graph takes, so they go (`unused`).
    `gradient_outputs=False` drops the `P + GRADIENT_SUFFIX` outputs, which only the JS
    raw-gradient pass reads: fetching them copies every gradient each step.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    gone = {*constants, *unused}
    inputs = [i for i in g.input if i.name not in gone]
    del g.input[:]
    g.input.extend(inputs)
    g.initializer.extend(
        numpy_helper.from_array(np.asarray(value), name) for name, value in constants.items()
    )
    if not gradient_outputs:
        outputs = [o for o in g.output if not o.name.endswith(GRADIENT_SUFFIX)]
        del g.output[:]
        g.output.extend(outputs)
    return out


def index_bounds(
    model: onnx.ModelProto, inputs: Sequence[str], shapes: Mapping[str, Sequence[int]]
) -> dict[str, int]:
    """Input name -> rows of the smallest table a `Gather` indexes with it directly.

    Token ids feed an embedding's Gather: an id outside [0, rows) fails inside onnxruntime
    (negative ids even wrap around), after earlier batches of the pass already stepped; the
    learners refuse such a batch before the first step. `shapes` holds the parameters'
    shapes; frozen tables are initializers of the graph.
    """
    tables = {n: list(v) for n, v in shapes.items()}
    tables.update({i.name: list(i.dims) for i in model.graph.initializer})
    bounds: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] not in inputs:
            continue
        table = tables.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table and axis == 0:
            name = node.input[1]
            bounds[name] = min(bounds.get(name, table[0]), table[0])
    return bounds


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


def set_learning_rate(model: onnx.ModelProto, lr: float) -> None:
    """Rewrite the recorded learning rate of an optimizer graph from `record_learning_rate`."""
    for init in model.graph.initializer:
        if init.name == LEARNING_RATE_INITIALIZER:
            init.CopyFrom(numpy_helper.from_array(np.array([lr], np.float32), init.name))
            return
    raise ValueError(f"the optimizer graph has no {LEARNING_RATE_INITIALIZER!r} initializer")


def add_importance_inputs(
    model: onnx.ModelProto, masked_shapes: Mapping[str, Sequence[int]], dtype: str
) -> None:
    """The eval graph is fed every checkpoint parameter, so it must declare the importance too."""
    model.graph.input.extend(_importance_inputs(masked_shapes, dtype))


def _shape_nodes(
    g: onnx.GraphProto, q: str, gamma: str, n: int, sharpness: float, budget: float | None
) -> str:
    """Nodes applying `capacity.shape_task_importance` to the float32 tensor `gamma`; the name
    of the result (`gamma` itself under the paper's values)."""
    if budget is not None and budget < 1.0 and n > 0:
        k = _const(g, q + ".budget_k", [max(1, math.ceil(budget * n))], np.int64)
        flat = _const(g, q + ".budget_flat", [-1], np.int64)
        g.node.extend(
            [
                helper.make_node("Reshape", [gamma, flat], [q + ".budget_all"]),
                helper.make_node(
                    "TopK", [q + ".budget_all", k], [q + ".budget_top", q + ".budget_idx"]
                ),
                helper.make_node("ReduceMin", [q + ".budget_top"], [q + ".budget_min"], keepdims=0),
                helper.make_node("GreaterOrEqual", [gamma, q + ".budget_min"], [q + ".budget_in"]),
                helper.make_node(
                    "Where", [q + ".budget_in", gamma, _PREFIX + "zero"], [q + ".budgeted"]
                ),
            ]
        )
        gamma = q + ".budgeted"
    if sharpness != 1.0:
        power = _const(g, q + ".sharpness", sharpness)
        g.node.append(helper.make_node("Pow", [gamma, power], [q + ".sharpened"]))
        gamma = q + ".sharpened"
    return gamma


def importance_update_model(
    shapes: Mapping[str, Sequence[int]],
    dtype: str,
    sharpness: float = 1.0,
    budget: float | None = None,
    decay: float = 1.0,
    cross_heads: bool = True,
) -> onnx.ModelProto:
    """Inference graph: per masked P, inputs `P.grads` (H, *shape) float32 and the stored A_P.

    Outputs `P.task_importance` = γ = max_h |tanh((g_h − mean g_h) / std g_h)| (unbiased std
    over the elements of one head's gradient; 0 where std is 0 or the tensor has one element)
    shaped by the capacity options (softmask_peft.capacity: only the top ⌈budget·n⌉ values of
    P kept, then γ**sharpness) and `P.softmask_importance.updated` = max(decay · A_P, γ), both
    in the storage dtype, and `softmask.mean_importance.updated` = ā of the updated, stored A
    (shape [1]). `cross_heads=False` (SPGConfig.cross_heads) reads only the last head's
    gradient, the current task's own loss. The paper's values (1, None, 1, True) add no node.
    """
    g = helper.make_graph([], "softmask_importance_update", [], [])
    p = _PREFIX
    add_codec_constants(g)
    zero = _const(g, p + "zero", 0.0)
    one = _const(g, p + "one", 1.0)
    flat = _const(g, p + "flat_shape", [0, -1], np.int64)
    axis1 = _const(g, p + "axis1", [1], np.int64)
    stype = STORAGE_TYPES[dtype]
    total = sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes.values())
    inv_total = _const(g, p + "inv_total", [1.0 / max(total, 1)])
    sums = []
    for name, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64))
        grads, stored = name + ".grads", name + IMPORTANCE_SUFFIX
        task_out, new_out = name + ".task_importance", stored + ".updated"
        g.input.extend(
            [
                helper.make_tensor_value_info(grads, TensorProto.FLOAT, ["heads", *shape]),
                helper.make_tensor_value_info(stored, stype, list(shape)),
            ]
        )
        g.output.extend(
            [
                helper.make_tensor_value_info(task_out, stype, list(shape)),
                helper.make_tensor_value_info(new_out, stype, list(shape)),
            ]
        )
        q = p + name
        if n < 2:
            g.initializer.append(numpy_helper.from_array(np.zeros(shape, np.float32), q + ".gamma"))
        else:
            dof = _const(g, q + ".dof", float(n - 1))
            shape_const = _const(g, q + ".shape", list(shape), np.int64)
            if not cross_heads:  # the current task's head is the last one fed
                last = _const(g, q + ".last", [-1], np.int64)
                end = _const(g, q + ".end", [np.iinfo(np.int64).max], np.int64)
                g.node.append(helper.make_node("Slice", [grads, last, end], [q + ".own"]))
                grads = q + ".own"
            g.node.extend(
                [
                    helper.make_node("Reshape", [grads, flat], [q + ".flat"]),
                    helper.make_node(
                        "ReduceMean", [q + ".flat"], [q + ".mean"], axes=[1], keepdims=1
                    ),
                    helper.make_node("Sub", [q + ".flat", q + ".mean"], [q + ".dev"]),
                    helper.make_node("Mul", [q + ".dev", q + ".dev"], [q + ".sq"]),
                    helper.make_node("ReduceSum", [q + ".sq", axis1], [q + ".ss"], keepdims=1),
                    helper.make_node("Div", [q + ".ss", dof], [q + ".var"]),
                    helper.make_node("Sqrt", [q + ".var"], [q + ".std"]),
                    helper.make_node("Greater", [q + ".std", zero], [q + ".ok"]),
                    helper.make_node("Where", [q + ".ok", q + ".std", one], [q + ".safe_std"]),
                    helper.make_node("Div", [q + ".dev", q + ".safe_std"], [q + ".z"]),
                    helper.make_node("Tanh", [q + ".z"], [q + ".t"]),
                    helper.make_node("Abs", [q + ".t"], [q + ".abs"]),
                    helper.make_node("Where", [q + ".ok", q + ".abs", zero], [q + ".per_head"]),
                    helper.make_node(
                        "ReduceMax", [q + ".per_head"], [q + ".max"], axes=[0], keepdims=0
                    ),
                    helper.make_node("Reshape", [q + ".max", shape_const], [q + ".gamma"]),
                ]
            )
        gamma = _shape_nodes(g, q, q + ".gamma", n, sharpness, budget)
        g.node.extend(decode_nodes(stored, q + ".old", dtype))
        old = q + ".old"
        if decay != 1.0:
            g.node.append(
                helper.make_node("Mul", [old, _const(g, q + ".decay", decay)], [q + ".faded"])
            )
            old = q + ".faded"
        g.node.append(helper.make_node("Max", [old, gamma], [q + ".new"]))
        g.node.extend(encode_nodes(gamma, task_out, dtype))
        g.node.extend(encode_nodes(q + ".new", new_out, dtype))
        # ā from what is stored (after encoding), so it agrees with the A the next steps read
        g.node.extend(decode_nodes(new_out, q + ".stored", dtype))
        g.node.append(helper.make_node("ReduceSum", [q + ".stored"], [q + ".sum"], keepdims=0))
        sums.append(q + ".sum")
    g.node.extend(
        [
            helper.make_node("Sum", sums, [p + "importance_sum"]),
            helper.make_node(
                "Mul", [p + "importance_sum", inv_total], [MEAN_IMPORTANCE + ".updated"]
            ),
        ]
    )
    g.output.append(
        helper.make_tensor_value_info(MEAN_IMPORTANCE + ".updated", TensorProto.FLOAT, [1])
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", IMPORTANCE_OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
