"""Codec nodes and the importance-update graph (plain inference ONNX). numpy + onnx only.

* `decode_nodes` / `encode_nodes`: the storage codec (softmask_format.codec) as ONNX nodes,
  on the constants `add_codec_constants` adds once per graph.
* `importance_update_model`: γ = max_h |tanh(standardize(g_h))|, A' = max(A, γ), ā'.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from softmask_format import codec

from .manifest import IMPORTANCE_SUFFIX, MEAN_IMPORTANCE

IMPORTANCE_OPSET = 17
# float16 importance travels as its IEEE-754 bit pattern in a uint16 tensor: ORT 1.19 cannot
# load float16 tensors from a checkpoint ("Unsupported data type: 10"), uint16 it can.
STORAGE_TYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.UINT16,
    "uint8": TensorProto.UINT8,
}
NAME_PREFIX = "softmask/"
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


def constant(
    graph: onnx.GraphProto, name: str, value: float | Sequence[int] | np.ndarray, dtype=np.float32
) -> str:
    """Add an initializer `name` holding `value`; return its name."""
    graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
    return name


def add_codec_constants(graph: onnx.GraphProto) -> None:
    """The constants `decode_nodes` / `encode_nodes` refer to (once per graph)."""
    for name, value in _CODEC_CONSTANTS.items():
        constant(graph, NAME_PREFIX + name, value)
    constant(graph, NAME_PREFIX + "int_one", 1, np.int64)


def decode_nodes(stored: str, out: str, dtype: str) -> list[onnx.NodeProto]:
    """Stored importance -> float32 (as softmask_format.codec.decode).

    uint8: A = the codec's table at the code (1 − 2^(−c/16), 255 -> 1). float16 bits b (A in
    [0, 1], sign 0): e = ⌊b / 1024⌋, m = b − 1024 e, A = m · 2^-24 if e = 0 else
    (1 + m / 1024) · 2^(e − 15), all exact in float32.
    """
    c = NAME_PREFIX
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
    c = NAME_PREFIX
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


def _shape_nodes(
    g: onnx.GraphProto, q: str, gamma: str, n: int, sharpness: float, budget: float | None
) -> str:
    """Nodes applying `capacity.shape_task_importance` to the float32 tensor `gamma`; the name
    of the result (`gamma` itself under the paper's values)."""
    if budget is not None and budget < 1.0 and n > 0:
        k = constant(g, q + ".budget_k", [max(1, math.ceil(budget * n))], np.int64)
        flat = constant(g, q + ".budget_flat", [-1], np.int64)
        g.node.extend(
            [
                helper.make_node("Reshape", [gamma, flat], [q + ".budget_all"]),
                helper.make_node(
                    "TopK", [q + ".budget_all", k], [q + ".budget_top", q + ".budget_idx"]
                ),
                helper.make_node("ReduceMin", [q + ".budget_top"], [q + ".budget_min"], keepdims=0),
                helper.make_node("GreaterOrEqual", [gamma, q + ".budget_min"], [q + ".budget_in"]),
                helper.make_node(
                    "Where", [q + ".budget_in", gamma, NAME_PREFIX + "zero"], [q + ".budgeted"]
                ),
            ]
        )
        gamma = q + ".budgeted"
    if sharpness != 1.0:
        power = constant(g, q + ".sharpness", sharpness)
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
    p = NAME_PREFIX
    add_codec_constants(g)
    zero = constant(g, p + "zero", 0.0)
    one = constant(g, p + "one", 1.0)
    flat = constant(g, p + "flat_shape", [0, -1], np.int64)
    axis1 = constant(g, p + "axis1", [1], np.int64)
    stype = STORAGE_TYPES[dtype]
    total = sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes.values())
    inv_total = constant(g, p + "inv_total", [1.0 / max(total, 1)])
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
            dof = constant(g, q + ".dof", float(n - 1))
            shape_const = constant(g, q + ".shape", list(shape), np.int64)
            if not cross_heads:  # the current task's head is the last one fed
                last = constant(g, q + ".last", [-1], np.int64)
                end = constant(g, q + ".end", [np.iinfo(np.int64).max], np.int64)
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
                helper.make_node("Mul", [old, constant(g, q + ".decay", decay)], [q + ".faded"])
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
