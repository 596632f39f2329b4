"""`softmask_edge` works on a device without torch: the whole device cycle, torch blocked."""

from __future__ import annotations

import numpy as np
from edge_helpers import batches, numpy_batches, run_device_process

DEVICE_SCRIPT = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import json
import numpy as np
import onnxruntime as ort
import softmask_edge
from softmask_edge import EdgeLearner, read_device_checkpoint

artifacts, data = sys.argv[1], json.loads(sys.argv[2])
batches = [(np.asarray(x, np.float32), np.asarray(y, np.int64)) for x, y in data]
learner = EdgeLearner(artifacts)
losses = learner.learn_task(batches, epochs=3, lr=0.1)
importance = learner.end_task(batches)
learner.save(artifacts)
learner.export_inference(artifacts + "/model.onnx")
session = ort.InferenceSession(artifacts + "/model.onnx", providers=["CPUExecutionProvider"])
logits = session.run(["logits"], {"input": batches[0][0], "task_id": np.array(2)})[0]
back = read_device_checkpoint(artifacts)
loaded = sorted(m for m, v in sys.modules.items() if m.split(".")[0] == "torch" and v is not None)
print(json.dumps({
    "losses": losses,
    "num_tasks": back.manifest.num_tasks,
    "logits_match": bool(np.allclose(logits, learner.predict(batches[0][0], task_id=2), atol=1e-6)),
    "importance_max": float(max(v.max() for v in importance.values())),
    "torch_modules": loaded,
}))
"""


def test_device_cycle_runs_with_torch_blocked(mlp_case):
    _, artifacts = mlp_case
    result = run_device_process(DEVICE_SCRIPT, artifacts, numpy_batches(batches(2)))
    assert result["torch_modules"] == []
    assert result["num_tasks"] == 3
    assert result["logits_match"]
    assert result["losses"][-1] < result["losses"][0]
    assert 0.5 < result["importance_max"] <= 1.0
    assert np.isfinite(result["losses"]).all()
