"""File names and format version shared by saving and loading (PEFT's utils/constants.py)."""

CONFIG_NAME = "softmask_config.json"
IMPORTANCE_NAME = "softmask_importance.safetensors"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
IMPORTANCE_DTYPES = ("float32", "float16", "uint8")
