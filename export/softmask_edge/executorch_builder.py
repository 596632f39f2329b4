"""Write ExecuTorch device artifacts from programs built on the torch side (numpy only here).

    manifest.json                   the same manifest as the ONNX artifacts (runtime: derived
                                    from the files its graphs_sha256 covers)
    training_program.pte            masked forward + backward; keep_P are inputs, weights external
    training_program.ptd            the weights the training program loads (FlatTensor)
    eval_program.pte                eval-mode forward with the weights as inputs: (loss, logits)
    inference_program.pte           eval-mode logits, weights external (`export_inference`
                                    writes it with a .ptd of the current weights)
    checkpoint-000000               uncompressed .npz: weights, `P.softmask_importance`, ā
    importance_history-000000.npz   per-task importance `task.{k}.{P}` (storage dtype)

The programs come from `softmask_peft.executorch_export`; this module never imports torch.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from softmask_format.atomic import commit_files

from .errors import ExportError
from .generation import check_roles, first_generation, stored_importance
from .manifest import (
    EXECUTORCH_FILES,
    IMPORTANCE_DTYPES,
    TASK_MODES,
    InputSpec,
    Manifest,
    capacity_fields,
    checkpoint_name,
    package_versions,
)
from .storage import save_arrays

EXECUTORCH_OPTIMIZERS = ("sgd",)


def build_executorch_artifacts(
    directory: str | os.PathLike,
    *,
    programs: Mapping[str, bytes],
    weights: Mapping[str, np.ndarray],
    trainable: Sequence[str],
    masked: Sequence[str],
    heads: Sequence[str],
    head_classes: Sequence[int],
    task_mode: str,
    inputs: Sequence[InputSpec],
    importance: Mapping[str, np.ndarray],
    history: Sequence[Mapping[str, np.ndarray]] = (),
    importance_dtype: str = "float32",
    optimizer: str = "sgd",
    task_names: Sequence[str] = (),
    versions: Mapping[str, str] | None = None,
    learning_rate: float = 0.05,
    scale_heads: bool = True,
    capacity: Mapping[str, Any] | None = None,
) -> Manifest:
    """Write `programs` (file name -> bytes, exactly `EXECUTORCH_FILES`) and generation 0.

    `weights` are the trainable parameters (float32) in the programs' order `trainable`;
    the rest as `build_artifacts`. The runtime's optimizer is SGD (with momentum as a learner
    option): AdamW is refused, since its moments would live outside the program and the
    device contract has no place for them.
    """
    for name, value, allowed in (
        ("task_mode", task_mode, TASK_MODES),
        ("optimizer", optimizer, EXECUTORCH_OPTIMIZERS),
        ("importance_dtype", importance_dtype, IMPORTANCE_DTYPES),
    ):
        if value not in allowed:
            raise ExportError(f"ExecuTorch export: {name} must be one of {allowed}, got {value!r}")
    if sorted(programs) != sorted(EXECUTORCH_FILES):
        raise ExportError(f"ExecuTorch export needs exactly {list(EXECUTORCH_FILES)}")
    if not masked:
        raise ExportError("nothing to mask: the model has no masked parameter")
    if not learning_rate > 0:
        raise ExportError(f"learning_rate must be > 0, got {learning_rate}")
    weights = {n: np.asarray(weights[n]) for n in trainable if n in weights}
    importance = {k: np.asarray(v, np.float32) for k, v in importance.items()}
    check_roles(
        {n: a.shape for n, a in weights.items()},
        [n for n, a in weights.items() if a.dtype != np.float32],
        trainable,
        masked,
        heads,
        importance,
    )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"cannot export into {str(directory)!r}: it is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    built: list[Manifest] = []

    def write(staging: Path) -> None:
        for name, data in programs.items():
            (staging / name).write_bytes(data)
        save_arrays(
            staging / checkpoint_name(0),
            {**weights, **stored_importance(masked, importance, importance_dtype)},
        )
        built.append(
            first_generation(
                staging,
                EXECUTORCH_FILES,
                history,
                task_mode=task_mode,
                inputs=list(inputs),
                params={n: list(a.shape) for n, a in weights.items()},
                masked=list(masked),
                heads=list(heads),
                head_classes=[int(c) for c in head_classes],
                num_classes=max(int(c) for c in head_classes),
                importance_dtype=importance_dtype,
                loss="cross_entropy",
                optimizer=optimizer,
                versions=package_versions(dict(versions or {})),
                task_names=list(task_names),
                parameter_order=list(trainable),
                heads_scaled=scale_heads,
                **capacity_fields(capacity),
                learning_rate=float(learning_rate),
                export_id=secrets.token_hex(16),
            )
        )

    commit_files(directory, write)
    return built[0]
