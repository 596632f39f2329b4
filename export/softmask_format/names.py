"""File names, format versions and importance storage dtypes (no import: the CLI reads them)."""

IMPORTANCE_DTYPES = ("float32", "float16", "uint8")  # encoded by `codec`

# torch checkpoint (softmask_peft: save_pretrained / from_pretrained)
CONFIG_NAME = "softmask_config.json"
IMPORTANCE_NAME = "softmask_importance.safetensors"
WEIGHTS_NAME = "model.safetensors"
# 2: the task log and DAS's general importance live in the importance file
# 3: uint8 importance is the log-keep code (codec.py); formats 1-2 stored round(255 · A)
FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)
LOG_UINT8_SINCE = 3  # first format (torch and device) whose uint8 importance is log-keep

# device artifacts (softmask_edge)
MANIFEST_NAME = "manifest.json"
TRAINING_MODEL_NAME = "training_model.onnx"
EVAL_MODEL_NAME = "eval_model.onnx"
OPTIMIZER_MODEL_NAME = "optimizer_model.onnx"
IMPORTANCE_MODEL_NAME = "importance_update.onnx"
# the ExecuTorch runtime's static files (same manifest, checkpoint and history scheme; which
# runtime a folder is for follows from the files its `graphs_sha256` covers)
TRAINING_PROGRAM_NAME = "training_program.pte"  # masked forward + backward, weights external
TRAINING_DATA_NAME = "training_program.ptd"  # the initial weights the training program loads
EVAL_PROGRAM_NAME = "eval_program.pte"  # eval-mode forward, weights as inputs: loss, logits
INFERENCE_PROGRAM_NAME = "inference_program.pte"  # eval-mode logits, weights in a .ptd beside it
# 2: SGD flag output of rank 0, the learning rate as an optimizer-graph initializer, gradient
#    outputs of the training graph, `parameter_order` (what onnxruntime-web needs);
# 3: the manifest hashes the graphs too (`graphs_sha256`) and records an `export_id` stamped
#    into every graph's metadata; uint8 importance is the log-keep code (codec.py).
#    1 and 2 still load (their graphs are not hashed) unless their importance is uint8 (the
#    old linear code): re-export those.
DEVICE_FORMAT_VERSION = 3
READABLE_DEVICE_FORMAT_VERSIONS = (1, 2, 3)
