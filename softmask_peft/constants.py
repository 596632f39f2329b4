"""File names, format version and storage dtypes of a checkpoint (PEFT's utils/constants.py).

Defined once in the torch-free `softmask_format`, which the device side reads too.
"""

from softmask_format.names import (
    CONFIG_NAME,
    FORMAT_VERSION,
    IMPORTANCE_DTYPES,
    IMPORTANCE_NAME,
    WEIGHTS_NAME,
)

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "IMPORTANCE_DTYPES", "IMPORTANCE_NAME", "WEIGHTS_NAME"]
