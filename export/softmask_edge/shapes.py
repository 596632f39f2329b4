"""Measured shapes for the forward graph, so ONNX Runtime builds correct broadcast gradients.

ORT's gradient builder (1.19.2, `ComputeBroadcastBackwardAxes`) reads the operands' shapes from
the graph's shape inference. Where both operands of a broadcasting op (Add, Mul, ...) have a
symbolic dimension it assumes the two are equal, even when the names differ ("a relaxing case,
the kernel might run into problem later"), and emits no ReduceSum. torch exports BERT's position
embedding as `Gather(pos_table, position_ids[:, :seq])`, shape `[unk__0, unk__1, H]` (really
`[1, seq, H]`), added to the word embedding `[batch, seq, H]`: at batch >= 2 the gradient of
the position table is then computed from a `[batch, seq, H]` tensor as if it were `[1, seq, H]`.
Native ORT silently writes a wrong gradient (and reads past the indices); onnxruntime-web's wasm
build corrupts its heap and hangs or traps ("memory access out of bounds").

`measure_shapes` runs the forward graph twice in plain onnxruntime, with two sizes for every
symbolic input dimension, and records every intermediate tensor's shape in `value_info`: a
dimension equal in both runs is that constant (the 1 that broadcasts), one that follows an
input's symbol gets its name, any other gets a name from the two measured sizes. ONNX shape
inference keeps what `value_info` says, so the gradient builder sees the broadcast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper
from softmask_format.contract import CONTRACT

# sizes of the symbolic input dimensions in the two probe runs (small: a sequence dimension
# must fit the smallest position table; distinct pairs, so a dimension's pair names it); in the
# device contract, since the learners probe old graphs with the same sizes
_PROBES = tuple(tuple(p) for p in CONTRACT["measured_shapes"]["probe_sizes"])


def probe_runs(model: onnx.ModelProto, names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """The tensors `names` (and the graph outputs) of one run per probe size, in plain
    onnxruntime with graph optimizations off. Inputs are zeros (index 0 is valid for every
    table; only shapes are read). Raises ValueError when the graph has more symbolic input
    dimensions than there are probe sizes.
    """
    import onnxruntime as ort

    symbols = _input_symbols(model)
    if len(symbols) > len(_PROBES[0]):
        raise ValueError(f"{len(symbols)} symbolic input dimensions; at most {len(_PROBES[0])}")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    outputs = {o.name for o in model.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    fetched = [o.name for o in session.get_outputs()]
    runs = []
    for sizes in _PROBES:
        size_of = dict(zip(symbols, sizes))
        feeds = {i.name: _zeros(i, size_of) for i in _user_inputs(model)}
        values = session.run(fetched, feeds)
        runs.append({n: np.asarray(v) for n, v in zip(fetched, values)})
    return runs


def measure_shapes(model: onnx.ModelProto) -> int:
    """Write the measured shape of every node output into `model.graph.value_info`.

    Returns how many tensors got a shape (see `probe_runs` for the inputs and errors).
    """
    names = [o for node in model.graph.node for o in node.output if o]
    known = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    known |= {o.name for o in model.graph.output}
    names = [n for n in dict.fromkeys(names) if n not in known]
    runs = probe_runs(model, names)
    symbols = _input_symbols(model)
    by_pair = {tuple(sizes[k] for sizes in _PROBES): s for k, s in enumerate(symbols)}
    del model.graph.value_info[:]
    count = 0
    for name in names:
        a, b = runs[0].get(name), runs[1].get(name)
        if a is None or b is None or a.ndim != b.ndim or a.dtype.kind not in "biuf":
            continue
        dims: list[int | str] = [
            x if x == y else by_pair.get((x, y), f"softmask_dim_{x}_{y}")
            for x, y in zip(a.shape, b.shape)
        ]
        elem = helper.np_dtype_to_tensor_dtype(a.dtype)
        model.graph.value_info.append(helper.make_tensor_value_info(name, elem, dims))
        count += 1
    return count


def _user_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _symbol(value: onnx.ValueInfoProto, axis: int) -> str:
    """A dynamic input dimension's name (its dim_param, or one made from input and axis)."""
    return value.type.tensor_type.shape.dim[axis].dim_param or f"{value.name}:{axis}"


def _input_symbols(model: onnx.ModelProto) -> list[str]:
    """The symbolic dimension names of the graph inputs, in order of appearance."""
    symbols: dict[str, None] = {}
    for value in _user_inputs(model):
        for axis, d in enumerate(value.type.tensor_type.shape.dim):
            if not d.HasField("dim_value"):
                symbols[_symbol(value, axis)] = None
    return list(symbols)


def _zeros(value: onnx.ValueInfoProto, size_of: Mapping[str, int]) -> np.ndarray:
    tensor = value.type.tensor_type
    shape = [
        d.dim_value if d.HasField("dim_value") else size_of[_symbol(value, axis)]
        for axis, d in enumerate(tensor.shape.dim)
    ]
    return np.zeros(shape, helper.tensor_dtype_to_np_dtype(tensor.elem_type))
