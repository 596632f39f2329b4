// Generated from export/softmask_format/device_contract.json by
// `python -m softmask_format.contract > export/js/contract.mjs`: do not edit.
export const CONTRACT = Object.freeze({
  "about": "The device contract, written once: file names, manifest schema, importance storage dtypes and codes, graph tensor names, error codes. Read by softmask_format.contract (Python) and compiled into export/js/contract.mjs (JS; a test checks the copy). Field types: int and int_list (min, max inclusive), number (min, finite), bool, enum (values), hex (length), plain_name, str_list, str_map, hex_map (plain names to hex), shape_map (names to shapes of at most max_rank dims in [0, max_dim]), inputs ({name, dtype in input_dtypes, shape with null for dynamic dims}). 'since': first format version that writes the field (readers of older formats accept its absence).",
  "errors": {
    "AbortError": {
      "base": "EdgeError",
      "code": "aborted",
      "js_only": true
    },
    "ArgumentError": {
      "base": "EdgeError",
      "code": "argument_error"
    },
    "ArtifactMismatchError": {
      "base": "EdgeError",
      "code": "artifact_mismatch"
    },
    "BatchError": {
      "base": "EdgeError",
      "code": "batch_error"
    },
    "CorruptArtifactError": {
      "base": "EdgeError",
      "code": "corrupt_artifact"
    },
    "EdgeError": {
      "base": null,
      "code": "edge_error"
    },
    "EmptyDataError": {
      "base": "EdgeError",
      "code": "empty_data"
    },
    "ExportError": {
      "base": "EdgeError",
      "code": "export_error"
    },
    "FatalRuntimeError": {
      "base": "OnnxRuntimeError",
      "code": "fatal_runtime",
      "js_only": true
    },
    "MissingArtifactError": {
      "base": "EdgeError",
      "code": "missing_artifact"
    },
    "NonFiniteGradientError": {
      "base": "EdgeError",
      "code": "non_finite_gradient"
    },
    "OnnxRuntimeError": {
      "base": "EdgeError",
      "code": "onnxruntime_error"
    },
    "SaveLocationError": {
      "base": "EdgeError",
      "code": "save_location"
    },
    "StaleWriterError": {
      "base": "EdgeError",
      "code": "stale_writer"
    },
    "TaskOrderError": {
      "base": "EdgeError",
      "code": "task_order"
    },
    "TerminatedError": {
      "base": "EdgeError",
      "code": "terminated",
      "js_only": true
    },
    "TimeoutError": {
      "base": "EdgeError",
      "code": "timeout",
      "js_only": true
    },
    "UnsupportedFormatError": {
      "base": "EdgeError",
      "code": "unsupported_format"
    }
  },
  "files": {
    "checkpoint_prefix": "checkpoint-",
    "eval_model": "eval_model.onnx",
    "generation_digits": 6,
    "history_prefix": "importance_history-",
    "history_suffix": ".npz",
    "importance_model": "importance_update.onnx",
    "manifest": "manifest.json",
    "optimizer_model": "optimizer_model.onnx",
    "plain_name_pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
    "training_model": "training_model.onnx"
  },
  "format_version": 4,
  "importance_dtypes": {
    "float16": {
      "bytes": 2,
      "checkpoint": "uint16",
      "note": "IEEE-754 half, carried as its bit pattern in uint16"
    },
    "float32": {
      "bytes": 4,
      "checkpoint": "float32"
    },
    "uint8": {
      "bytes": 1,
      "checkpoint": "uint8",
      "note": "log-keep code: A = 1 - 2^(-c/16), c = 255 is A = 1 (format >= 3)",
      "steps_per_octave": 16,
      "zero_keep_code": 255
    }
  },
  "input_dtypes": [
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool"
  ],
  "limits": {
    "max_count": 2147483648,
    "max_dim": 1099511627776,
    "max_generation": 999999,
    "max_manifest_bytes": 4194304,
    "max_rank": 16
  },
  "log_uint8_since": 3,
  "manifest": {
    "checkpoint": {
      "required": true,
      "type": "plain_name"
    },
    "checkpoint_sha256": {
      "length": 64,
      "required": true,
      "type": "hex"
    },
    "cross_heads": {
      "type": "bool"
    },
    "export_id": {
      "length": 32,
      "since": 3,
      "type": "hex"
    },
    "format_version": {
      "max": 1000000,
      "min": 1,
      "required": true,
      "type": "int"
    },
    "generation": {
      "max": 999999,
      "min": 0,
      "required": true,
      "type": "int"
    },
    "graphs_sha256": {
      "length": 64,
      "since": 3,
      "type": "hex_map"
    },
    "head_classes": {
      "max": 2147483648,
      "min": 1,
      "required": true,
      "type": "int_list"
    },
    "heads": {
      "required": true,
      "type": "str_list"
    },
    "heads_scaled": {
      "type": "bool"
    },
    "history": {
      "required": true,
      "type": "plain_name"
    },
    "history_sha256": {
      "length": 64,
      "required": true,
      "type": "hex"
    },
    "importance_budget": {
      "max": 1,
      "min": 0,
      "type": "number"
    },
    "importance_decay": {
      "max": 1,
      "min": 0,
      "type": "number"
    },
    "importance_dtype": {
      "required": true,
      "type": "enum",
      "values": [
        "float32",
        "float16",
        "uint8"
      ]
    },
    "importance_sharpness": {
      "min": 1,
      "type": "number"
    },
    "inputs": {
      "required": true,
      "type": "inputs"
    },
    "learning_rate": {
      "min": 0,
      "since": 2,
      "type": "number"
    },
    "loss": {
      "required": true,
      "type": "enum",
      "values": [
        "cross_entropy"
      ]
    },
    "masked": {
      "required": true,
      "type": "str_list"
    },
    "num_classes": {
      "max": 2147483648,
      "min": 0,
      "required": true,
      "type": "int"
    },
    "num_tasks": {
      "max": 2147483648,
      "min": 0,
      "required": true,
      "type": "int"
    },
    "optimizer": {
      "required": true,
      "type": "enum",
      "values": [
        "sgd",
        "adamw"
      ]
    },
    "parameter_order": {
      "since": 2,
      "type": "str_list"
    },
    "params": {
      "required": true,
      "type": "shape_map"
    },
    "task_mode": {
      "required": true,
      "type": "enum",
      "values": [
        "task_incremental",
        "shared_head"
      ]
    },
    "task_names": {
      "type": "str_list"
    },
    "versions": {
      "required": true,
      "type": "str_map"
    }
  },
  "measured_shapes": {
    "about": "Format 4: the exporter measured the forward graph's shapes (softmask_edge.shapes) before ONNX Runtime 1.19.2 built the gradient graph. In an older ONNX Runtime artifact, a training-graph node of broadcast_ops with an operand X whose gradient X + gradient_name_suffix the graph computes, and whose two operands carry different symbolic dimensions at one right-aligned axis, is where the gradient builder guessed the sizes equal and summed nothing over that axis. The guess was wrong where, running the eval graph with every symbolic input dimension at probe_sizes (zeros as inputs), such an operand has another size at that axis than the node's output (BERT's position embedding, [1, seq, H] + [batch, seq, H]): its gradient is wrong at batch >= 2. Both learners refuse those artifacts (UnsupportedFormatError): export them again.",
    "broadcast_ops": [
      "Add",
      "Sub",
      "Mul",
      "Div",
      "Pow"
    ],
    "gradient_name_suffix": "_grad",
    "probe_sizes": [
      [
        2,
        3,
        4,
        5
      ],
      [
        3,
        5,
        7,
        9
      ]
    ],
    "since": 4
  },
  "readable_format_versions": [
    1,
    2,
    3,
    4
  ],
  "tensors": {
    "cross_head_input": "softmask_cross_head",
    "export_id_key": "softmask.export_id",
    "gradient_suffix": ".softmask_gradient",
    "importance_suffix": ".softmask_importance",
    "labels_input": "labels",
    "learning_rate_initializer": "softmask.learning_rate",
    "logits_output": "logits",
    "loss_output": "loss",
    "mean_importance": "softmask.mean_importance",
    "scale_input": "softmask_scale",
    "task_input": "task_id"
  }
});
