"""What a learner does to the graphs it loads: per-session specialization, the learning rate,
the token-id bounds. numpy + onnx only.

* `specialize`: the graphs one training session runs, with s, A and ā as constants.
* `set_learning_rate`: rewrite the lr recorded in an optimizer graph (format 2).
* `index_bounds`: the row count of the table each integer input indexes (token ids).
* `guessed_broadcasts`, `wrong_broadcasts`: where ONNX Runtime 1.19.2 built a broadcast
  gradient from guessed shapes, and where that guess was wrong (artifacts before format 4;
  see `softmask_edge.shapes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .manifest import (
    BROADCAST_OPS,
    GRADIENT_NAME_SUFFIX,
    GRADIENT_SUFFIX,
    LEARNING_RATE_INITIALIZER,
)
from .shapes import probe_runs


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


@dataclass(frozen=True)
class GuessedBroadcast:
    """A broadcasting node whose gradient ORT built on a guess (`guessed_broadcasts`).

    `operands`: positions (0, 1) of its inputs ORT built a gradient for; `axes`: the
    right-aligned axes (-1 is the last) where the two operands carry different symbolic
    dimensions."""

    node: str
    operands: tuple[int, ...]
    axes: tuple[int, ...]


def guessed_broadcasts(model: onnx.ModelProto) -> list[GuessedBroadcast]:
    """The broadcasting nodes of a training graph whose gradient ORT 1.19.2 built on a guess.

    ORT's `ComputeBroadcastBackwardAxes` reads the operands' shapes as recorded in the graph
    (and written into its `value_info`); at an axis (right-aligned) where both carry a symbolic
    dimension with different names it assumes the sizes are equal and sums nothing over that
    axis. Only operands ORT built a gradient for count: the graph has a tensor named
    `<operand><GRADIENT_NAME_SUFFIX>` (ORT's naming). Operands without a recorded shape got a
    run-time reduction (`BroadcastGradientArgs`) and are right. Whether a guess was wrong is
    a question of sizes at run time: `wrong_broadcasts`.
    """
    g = model.graph
    dims: dict[str, list[str | int | None]] = {}
    for value in (*g.input, *g.value_info, *g.output):
        t = value.type.tensor_type
        if t.HasField("shape"):
            dims[value.name] = [
                d.dim_param
                if d.HasField("dim_param")
                else (d.dim_value if d.HasField("dim_value") else None)
                for d in t.shape.dim
            ]
    produced = {o for node in g.node for o in node.output}
    guessed = []
    for node in g.node:
        if node.op_type not in BROADCAST_OPS or len(node.input) != 2:
            continue
        operands = tuple(
            k for k, i in enumerate(node.input) if i + GRADIENT_NAME_SUFFIX in produced
        )
        a, b = (dims.get(i) for i in node.input)
        if not operands or a is None or b is None:
            continue
        axes = tuple(
            -k
            for k in range(1, min(len(a), len(b)) + 1)
            if isinstance(a[-k], str) and isinstance(b[-k], str) and a[-k] != b[-k]
        )
        if axes:
            guessed.append(GuessedBroadcast(node.name or node.output[0], operands, axes))
    return guessed


def wrong_broadcasts(evaluation: onnx.ModelProto, guessed: Sequence[GuessedBroadcast]) -> list[str]:
    """Names of the `guessed` nodes whose guess was wrong: run the forward (eval) graph at the
    contract's two probe sizes (`shapes.probe_runs`); a node is wrong where, at one of its
    guessed axes, an operand on the gradient path has another size than the node's output
    (it was broadcast, and its gradient was not summed over that axis). A node the eval graph
    lacks cannot be measured and counts as wrong.
    """
    nodes = {n.name: n for n in evaluation.graph.node if n.name}
    unmatched = [x.node for x in guessed if x.node not in nodes or len(nodes[x.node].input) != 2]
    checks = [x for x in guessed if x.node not in unmatched]
    names = {t for x in checks for t in (*nodes[x.node].input, nodes[x.node].output[0])}
    runs = probe_runs(evaluation, sorted(names)) if checks else []
    wrong = []
    for x in checks:
        node = nodes[x.node]
        out = node.output[0]
        if any(
            run[node.input[i]].shape[k] != run[out].shape[k]
            for run in runs
            for i in x.operands
            for k in x.axes
        ):
            wrong.append(x.node)
    return unmatched + wrong


def set_learning_rate(model: onnx.ModelProto, lr: float) -> None:
    """Rewrite the recorded learning rate of an optimizer graph from `record_learning_rate`."""
    for init in model.graph.initializer:
        if init.name == LEARNING_RATE_INITIALIZER:
            init.CopyFrom(numpy_helper.from_array(np.array([lr], np.float32), init.name))
            return
    raise ValueError(f"the optimizer graph has no {LEARNING_RATE_INITIALIZER!r} initializer")
