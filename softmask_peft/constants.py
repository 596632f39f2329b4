"""File names and format version shared by saving and loading (PEFT's utils/constants.py)."""

CONFIG_NAME = "softmask_config.json"
IMPORTANCE_NAME = "softmask_importance.safetensors"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 2  # 2: task log and DAS general importance in the importance file
READABLE_FORMAT_VERSIONS = (1, 2)
IMPORTANCE_DTYPES = ("float32", "float16", "uint8")
