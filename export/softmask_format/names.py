"""File names, format versions and importance storage dtypes (stdlib only: the CLI reads them).

The device names come from the device contract (device_contract.json, via `contract`).
"""

from .contract import CONTRACT as _DEVICE

IMPORTANCE_DTYPES = tuple(_DEVICE["importance_dtypes"])  # encoded by `codec`

# torch checkpoint (softmask_peft: save_pretrained / from_pretrained)
CONFIG_NAME = "softmask_config.json"
IMPORTANCE_NAME = "softmask_importance.safetensors"
WEIGHTS_NAME = "model.safetensors"
# 2: the task log and DAS's general importance live in the importance file
# 3: uint8 importance is the log-keep code (codec.py); formats 1-2 stored round(255 · A)
# 4: the config holds the capacity options (importance_sharpness, _budget, _decay); formats 1-3
#    load with the paper's values
# 5: the config holds lora_mask; with "subspace" a LoRA PeftModel's checkpoint adds
#    LORA_SUBSPACE_NAME; formats 1-4 load with lora_mask = "factors"
FORMAT_VERSION = 5
READABLE_FORMAT_VERSIONS = (1, 2, 3, 4, 5)
# lora_mask="subspace": per adapted layer "{layer}.covariance" (in, in) and "{layer}.base_weight"
# (out, in, every finished task folded in), float32; metadata format_version and save_id
LORA_SUBSPACE_NAME = "lora_subspace.safetensors"
LOG_UINT8_SINCE: int = _DEVICE[
    "log_uint8_since"
]  # first format (torch and device) whose uint8 importance is log-keep

# device artifacts (softmask_edge)
MANIFEST_NAME: str = _DEVICE["files"]["manifest"]
TRAINING_MODEL_NAME: str = _DEVICE["files"]["training_model"]
EVAL_MODEL_NAME: str = _DEVICE["files"]["eval_model"]
OPTIMIZER_MODEL_NAME: str = _DEVICE["files"]["optimizer_model"]
IMPORTANCE_MODEL_NAME: str = _DEVICE["files"]["importance_model"]
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
# 4: the exporter measured the forward graph's shapes before ONNX Runtime built the gradient
#    graph (softmask_edge.shapes). Older ONNX Runtime artifacts still load unless their training
#    graph has a broadcast gradient ORT built on a wrong guess (BERT's position table: wrong at
#    batch >= 2; session_graphs.wrong_broadcasts); MLP and CNN artifacts have no guess.
DEVICE_FORMAT_VERSION: int = _DEVICE["format_version"]
READABLE_DEVICE_FORMAT_VERSIONS = tuple(_DEVICE["readable_format_versions"])
