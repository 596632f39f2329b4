"""The ONNX pieces on their own: importance-update graph, LayerNormalization fix, session graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from edge_helpers import export_copy, mlp_model_after_two_tasks
from onnx import TensorProto, helper, numpy_helper
from softmask_edge import EdgeLearner
from softmask_edge.graphs import add_gradient_outputs
from softmask_edge.importance_graph import (
    STORAGE_TYPES,
    add_codec_constants,
    decode_nodes,
    encode_nodes,
    importance_update_model,
)
from softmask_edge.session_graphs import specialize
from softmask_format import codec

from softmask_peft.importance import normalize_importance

SHAPES = {"w": [3, 4], "b": [3], "scalar": [1]}


def _run(dtype: str, grads: dict[str, np.ndarray], stored: dict[str, np.ndarray], **capacity):
    session = ort.InferenceSession(
        importance_update_model(SHAPES, dtype, **capacity).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    feeds = {f"{n}.grads": grads[n] for n in SHAPES}
    feeds.update({f"{n}.softmask_importance": stored[n] for n in SHAPES})
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _reference(g: np.ndarray) -> np.ndarray:
    """max over heads of |tanh((g_h - mean) / std_unbiased)|, written out with numpy."""
    flat = g.reshape(g.shape[0], -1).astype(np.float64)
    std = flat.std(axis=1, ddof=1, keepdims=True)
    z = (flat - flat.mean(axis=1, keepdims=True)) / std
    return np.abs(np.tanh(z)).max(axis=0).reshape(g.shape[1:])


def test_update_graph_is_standardize_tanh_abs_max_over_heads_then_max():
    rng = np.random.default_rng(0)
    grads = {n: rng.normal(size=(3, *s)).astype(np.float32) for n, s in SHAPES.items()}
    grads["b"][1] = 5.0  # one head with a constant gradient: std 0 -> importance 0 for that head
    stored = {n: rng.uniform(0, 0.6, size=s).astype(np.float32) for n, s in SHAPES.items()}
    out = _run("float32", grads, stored)
    for n in ("w", "b"):
        h = [0, 2] if n == "b" else [0, 1, 2]
        expected = _reference(grads[n][h])
        np.testing.assert_allclose(out[f"{n}.task_importance"], expected, atol=1e-6)
        np.testing.assert_allclose(
            out[f"{n}.softmask_importance.updated"], np.maximum(stored[n], expected), atol=1e-6
        )
        # the same map as the torch side's normalize_importance, head by head
        torch_side = torch.stack([normalize_importance(torch.from_numpy(g)) for g in grads[n]])
        np.testing.assert_allclose(
            out[f"{n}.task_importance"], torch_side.amax(0).numpy(), atol=1e-6
        )
    np.testing.assert_array_equal(out["scalar.task_importance"], np.zeros(1, np.float32))
    np.testing.assert_array_equal(out["scalar.softmask_importance.updated"], stored["scalar"])


def test_update_graph_applies_the_capacity_options_as_the_torch_side():
    rng = np.random.default_rng(1)
    grads = {n: rng.normal(size=(3, *s)).astype(np.float32) for n, s in SHAPES.items()}
    stored = {n: rng.uniform(0, 1, size=s).astype(np.float32) for n, s in SHAPES.items()}
    out = _run("float32", grads, stored, sharpness=3.0, budget=0.25, decay=0.5, cross_heads=False)
    for n in ("w", "b"):
        own = _reference(grads[n][-1:])  # cross_heads=False: the last (current) head only
        k = int(np.ceil(0.25 * own.size))  # w: 3 of 12 values, b: 1 of 3
        threshold = np.sort(own.ravel())[::-1][k - 1]
        expected = np.where(own >= threshold, own, 0.0) ** 3
        assert int((expected > 0).sum()) == k
        np.testing.assert_allclose(out[f"{n}.task_importance"], expected, atol=1e-6)
        np.testing.assert_allclose(
            out[f"{n}.softmask_importance.updated"],
            np.maximum(0.5 * stored[n], expected),
            atol=1e-6,
        )


def test_zero_gradients_give_zero_importance():
    grads = {n: np.zeros((2, *s), np.float32) for n, s in SHAPES.items()}
    stored = {n: np.full(s, 0.25, np.float32) for n, s in SHAPES.items()}
    out = _run("float32", grads, stored)
    for n in SHAPES:
        np.testing.assert_array_equal(out[f"{n}.task_importance"], np.zeros(SHAPES[n], np.float32))
        np.testing.assert_array_equal(out[f"{n}.softmask_importance.updated"], stored[n])


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_update_graph_decodes_and_encodes_the_storage_dtype(dtype):
    rng = np.random.default_rng(1)
    grads = {n: rng.normal(size=(1, *s)).astype(np.float32) for n, s in SHAPES.items()}
    if dtype == "uint8":  # the log-keep code: A = 1 − 2^(−c/16), 255 -> 1
        stored = {n: rng.integers(0, 256, size=s).astype(np.uint8) for n, s in SHAPES.items()}
        old = {n: _log_keep_a(stored[n]) for n in SHAPES}
    else:
        halves = {n: rng.uniform(0, 1, size=s).astype(np.float16) for n, s in SHAPES.items()}
        stored = {n: h.view(np.uint16) for n, h in halves.items()}
        old = {n: halves[n].astype(np.float32) for n in SHAPES}
    out = _run(dtype, grads, stored)
    gamma = _reference(grads["w"])
    new = np.maximum(old["w"], gamma)
    task, updated = out["w.task_importance"], out["w.softmask_importance.updated"]
    if dtype == "uint8":
        assert task.dtype == updated.dtype == np.uint8
        np.testing.assert_array_equal(updated, codec.encode(new, "uint8"))
        np.testing.assert_array_equal(task, codec.encode(gamma, "uint8"))
    else:
        assert task.dtype == updated.dtype == np.uint16
        np.testing.assert_allclose(updated.view(np.float16).astype(np.float32), new, atol=5e-4)
        np.testing.assert_allclose(task.view(np.float16).astype(np.float32), gamma, atol=5e-4)


def _log_keep_a(codes: np.ndarray) -> np.ndarray:
    keep = np.where(codes == 255, 0.0, 2.0 ** (-codes.astype(np.float64) / 16))
    return (1.0 - keep).astype(np.float32)


def _codec_session(dtype: str, direction: str) -> ort.InferenceSession:
    storage = STORAGE_TYPES[dtype]
    if direction == "decode":
        x = helper.make_tensor_value_info("x", storage, [None])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
        nodes = decode_nodes("x", "y", dtype)
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])
        y = helper.make_tensor_value_info("y", storage, [None])
        nodes = encode_nodes("x", "y", dtype)
    graph = helper.make_graph(nodes, "codec", [x], [y])
    add_codec_constants(graph)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_float16_bit_codec_is_exact_on_every_value_in_unit_interval():
    """All 15,361 float16 values in [0, 1] (subnormals included) decode and re-encode exactly."""
    bits = np.arange(0, 0x3C01, dtype=np.uint16)
    decoded = _codec_session("float16", "decode").run(["y"], {"x": bits})[0]
    np.testing.assert_array_equal(decoded, bits.view(np.float16).astype(np.float32))
    encoded = _codec_session("float16", "encode").run(["y"], {"x": decoded})[0]
    np.testing.assert_array_equal(encoded, bits)
    floats = np.random.default_rng(0).uniform(0, 1, 5000).astype(np.float32)
    floats[:3] = [0.0, 1.0, 3e-7]
    encoded = _codec_session("float16", "encode").run(["y"], {"x": floats})[0]
    np.testing.assert_array_equal(encoded, floats.astype(np.float16).view(np.uint16))


def test_uint8_log_keep_graph_codec_is_the_numpy_codec_bit_for_bit():
    """Decode: all 256 codes. Encode: every grid value, every boundary and its float32
    neighbours, 0, 1, 1 + 1 ulp (ORT's Tanh can round there) and 20,000 random values,
    biased towards A near 1."""
    codes = np.arange(256, dtype=np.uint8)
    decoded = _codec_session("uint8", "decode").run(["y"], {"x": codes})[0]
    np.testing.assert_array_equal(decoded, _log_keep_a(codes))
    np.testing.assert_array_equal(decoded, codec.decode(codes))
    bounds = codec.UINT8_BOUNDARIES
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            decoded,
            bounds,
            np.nextafter(bounds, np.float32(0)),
            np.nextafter(bounds, np.float32(1)),
            [0.0, 1.0, 2.0**-30, np.nextafter(np.float32(1), np.float32(2))],
            rng.uniform(0, 1, 10000),
            1 - 2.0 ** -rng.uniform(0, 17, 10000),
        ]
    ).astype(np.float32)
    encoded = _codec_session("uint8", "encode").run(["y"], {"x": values})[0]
    np.testing.assert_array_equal(encoded, codec.encode(values, "uint8"))
    np.testing.assert_array_equal(encoded[:256], codes)


def _layer_norm_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    scale = numpy_helper.from_array(np.array([1, 2, 3, 4], np.float32), "scale")
    bias = numpy_helper.from_array(np.zeros(4, np.float32), "bias")
    node = helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], epsilon=1e-5)
    graph = helper.make_graph([node], "ln", [x], [y], [scale, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_layer_norm_gets_mean_and_inv_std_outputs_and_still_computes_the_same():
    model = _layer_norm_model()
    x = np.array([[1, 2, 3, 4], [0, 0, 1, -1]], np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(["y"], {"x": x})[0]
    assert add_gradient_outputs(model) == 1
    assert len(model.graph.node[0].output) == 3
    onnx.checker.check_model(model)
    after = ort.InferenceSession(model.SerializeToString()).run(["y"], {"x": x})[0]
    centered = x - x.mean(axis=1, keepdims=True)
    expected = centered / np.sqrt((centered**2).mean(axis=1, keepdims=True) + 1e-5) * [1, 2, 3, 4]
    np.testing.assert_allclose(after, before)
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-5)
    assert add_gradient_outputs(model) == 0


def _optimized(model: onnx.ModelProto, path) -> onnx.ModelProto:
    """The graph ONNX Runtime runs after its basic and extended rewrites (constant folding)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(path)


def _masking_inputs(model: onnx.ModelProto, masked: list[str]) -> dict[str, list[str]]:
    """Per masked parameter: the op types between its gradient and its accumulator."""
    producer = {out: node for node in model.graph.node for out in node.output}
    constants = {i.name for i in model.graph.initializer}
    chains = {}
    for node in model.graph.node:
        if node.op_type != "InPlaceAccumulatorV2":
            continue
        param = node.input[1].removesuffix(".masked").removesuffix("_grad")
        if param not in masked:
            continue
        mul = producer[node.input[1]]
        keep = mul.input[1]
        chains[param] = [mul.op_type, "constant" if keep in constants else producer[keep].op_type]
    return chains


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_learner_graph_masks_with_one_mul_by_a_folded_constant(tmp_path, dtype):
    """`specialize` + ONNX Runtime's constant folding: in the graph a learner's session runs,
    each masked gradient reaches its accumulator through one Mul by a constant, and nothing
    reads s or A any more; run as written, keep = 1 − s·decode(A) is computed every step."""
    artifacts = export_copy(mlp_model_after_two_tasks(), tmp_path / "a", importance_dtype=dtype)
    learner = EdgeLearner(artifacts)
    masked = learner.manifest.masked
    written = onnx.load(artifacts / "training_model.onnx")
    constants = learner._runtime._constants(learner._runtime._session.state, 1.0)
    session_graph = specialize(written, constants, gradient_outputs=False)
    scale = next(i for i in session_graph.graph.initializer if i.name == "softmask_scale")
    assert list(scale.dims) == []  # the graph declares a scalar
    folded = _optimized(session_graph, tmp_path / "f")
    as_written = _optimized(written, tmp_path / "w")

    assert _masking_inputs(folded, masked) == {n: ["Mul", "constant"] for n in masked}
    read = {i for node in folded.graph.node for i in node.input}
    assert not read & set(constants)
    assert not [o.name for o in folded.graph.output if o.name.endswith(".softmask_gradient")]
    assert _masking_inputs(as_written, masked) == {n: ["Mul", "Sub"] for n in masked}
    assert {"softmask_scale", *(n + ".softmask_importance" for n in masked)} <= {
        i for node in as_written.graph.node for i in node.input
    }
