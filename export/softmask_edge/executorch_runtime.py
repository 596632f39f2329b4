"""The ExecuTorch side of `EdgeLearner`: the training program, its SGD, and the eval program.

ExecuTorch's Python bindings (`executorch.extension.pybindings`, `.training`) pass torch
tensors, so this module imports torch; the rest of softmask_edge does not, and only a learner
opened on ExecuTorch artifacts imports this module. On a phone the C++ runtime's training
module runs the same files (docs/guides/executorch.md).

The weights live in the program's mutable memory, loaded from `training_program.ptd`; a
checkpoint generation (an .npz: weights, stored A_P, ā) is copied over them at load. The
program returns [loss, logits, gradients..., parameters...]; the parameter outputs alias the
program's weights, so the SGD step updates them in place (ExecuTorch's own TrainingModule
relies on the same). keep_P are program inputs, rebuilt from the stored A when it changes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from softmask_format.atomic import atomic_write

from .checkpoint import load_arrays
from .errors import ArgumentError, ArtifactMismatchError, EdgeError, ExecuTorchError
from .importance import update_importance
from .manifest import (
    CROSS_HEAD_INPUT,
    EVAL_PROGRAM_NAME,
    IMPORTANCE_SUFFIX,
    INFERENCE_PROGRAM_NAME,
    LABELS_INPUT,
    MEAN_IMPORTANCE,
    PROGRAM_PARAMETER_PREFIX,
    TASK_INPUT,
    TRAINING_DATA_NAME,
    TRAINING_PROGRAM_NAME,
    Manifest,
)
from .storage import decode, save_arrays

try:
    import torch
    from executorch.exir._serialize._named_data_store import NamedDataStore
    from executorch.exir._serialize.data_serializer import DataPayload
    from executorch.exir.scalar_type import ScalarType
    from executorch.exir.tensor_layout import TensorLayout
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer
    from executorch.extension.pybindings.portable_lib import _load_for_executorch
    from executorch.extension.training import get_sgd_optimizer
except ImportError as e:  # pragma: no cover - depends on the install
    raise ExecuTorchError(
        "these artifacts are ExecuTorch programs: install the runtime "
        f"(pip install executorch==1.5.1, which needs torch): {e}"
    ) from e

_METHOD = "forward"


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A torch view of `a`, C-contiguous, rank kept (np.ascontiguousarray makes 0-d arrays 1-d)."""
    return torch.from_numpy(np.asarray(a, order="C"))


@contextlib.contextmanager
def translated(step: str, error: type[EdgeError] = ExecuTorchError) -> Iterator[None]:
    """ExecuTorch raises RuntimeError (with an error code) from C++: re-raise as `error`."""
    try:
        yield
    except EdgeError:
        raise
    except (RuntimeError, ValueError, TypeError) as e:
        raise error(f"{step}: ExecuTorch raised {type(e).__name__}: {e}") from e


class ExecuTorchRuntime:
    """The training program (weights inside), its SGD optimizer, and the eval program.

    Args:
        directory, manifest: the loaded artifacts (files verified by the caller).
        seed: unused: ExecuTorch's dropout kernel draws from its own generator, which no
            Python call reaches (programs with dropout are not reproducible; the export warns).
        threads: unused (the portable kernels run on the calling thread).
        momentum: SGD momentum (torch.optim.SGD's formula, dampening 0).
    """

    index_bounds: dict[str, int] = {}  # programs are not inspected for embedding tables

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        seed: int | None,
        threads: int | None,
        momentum: float,
    ) -> None:
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ArgumentError(f"momentum must be a number in [0, 1), got {momentum!r}")
        self.manifest, self.momentum = manifest, float(momentum)
        self._directory = directory
        arrays = load_arrays(directory, manifest)
        self._stored = {n: arrays[n] for n in arrays if n not in manifest.params}
        self._order = list(manifest.parameter_order)
        fitting = f"the programs in {str(directory)!r} do not fit its checkpoint"
        with translated(fitting, ArtifactMismatchError):
            self._train = _load_for_executorch(
                os.fspath(directory / TRAINING_PROGRAM_NAME),
                os.fspath(directory / TRAINING_DATA_NAME),
            )
            self._eval = _load_for_executorch(os.fspath(directory / EVAL_PROGRAM_NAME))
            index = "__et_training_{}_" + _METHOD
            self._grad_start = self._train.run_method(index.format("gradients_index"), ())[0]
            self._param_start = self._train.run_method(index.format("parameters_index"), ())[0]
            fqn = list(self._train.run_method(index.format("fqn"), ()))
            # memory is planned for the bound of the dynamic batch dimension (export's max_batch)
            self.max_batch = int(self._train.method_meta(_METHOD).input_tensor_meta(0).sizes()[0])
        expected = [PROGRAM_PARAMETER_PREFIX + n for n in self._order]
        if fqn != expected or sorted(self._order) != sorted(manifest.params):
            raise ArtifactMismatchError(
                f"{fitting}: the training program's parameters {fqn[:4]}... are not the "
                f"manifest's {expected[:4]}..."
            )
        self._scale: float | None = None
        self._keeps: list[torch.Tensor] = []
        self.use_scale(1.0)
        with translated(fitting, ArtifactMismatchError):
            self._params = self._bind()
        self.set({n: arrays[n] for n in manifest.params})
        self._optimizer = None
        self._lr: float | None = None

    def _bind(self) -> dict[str, torch.Tensor]:
        """The program's weight tensors: outputs of one run (a zero batch, no step taken)."""
        feeds = {}
        for spec in self.manifest.inputs:
            shape = [1 if d is None else d for d in spec.shape]
            feeds[spec.name] = np.zeros(shape, np.dtype(spec.dtype))
        feeds[LABELS_INPUT] = np.zeros(1, np.int64)
        feeds[CROSS_HEAD_INPUT] = np.array(0.0, np.float32)
        if self.manifest.task_mode == "task_incremental":
            feeds[TASK_INPUT] = np.array(0, np.int64)
        out = self._run(feeds)
        return dict(zip(self._order, out[self._param_start :]))

    def translated(
        self, step: str, error: type[EdgeError] = ExecuTorchError
    ) -> contextlib.AbstractContextManager[None]:
        return translated(step, error)

    # tensors ------------------------------------------------------------------------------

    def get(self, name: str) -> np.ndarray:
        if name in self._stored:
            return self._stored[name]
        return self._params[name].numpy()

    def set(self, values: Mapping[str, np.ndarray]) -> None:
        for name, value in values.items():
            if name in self.manifest.params:
                self._params[name].copy_(_tensor(value))
            else:
                self._stored[name] = np.asarray(value, order="C")
                self._scale = None  # the keep inputs hold the old importance

    # steps --------------------------------------------------------------------------------

    def use_scale(self, scale: float) -> bool:
        """keep_P = 1 − s·A_P (masked), 1 − s·ā (heads, unless unscaled), 1 (others)."""
        if self._scale == scale:
            return False
        s = np.float32(scale)
        masked, heads = set(self.manifest.masked), set(self.manifest.heads)
        head_keep = np.float32(1) - s * self._stored[MEAN_IMPORTANCE].astype(np.float32)
        keeps = []
        for n in self._order:
            if n in masked:
                keep = np.float32(1) - s * decode(self._stored[n + IMPORTANCE_SUFFIX])
            elif n in heads and self.manifest.heads_scaled:
                keep = head_keep
            else:
                keep = np.ones(1, np.float32)
            keeps.append(_tensor(np.asarray(keep, np.float32)))
        self._keeps, self._scale = keeps, scale
        self._optimizer = None
        return True

    def _inputs(self, feeds: Mapping[str, np.ndarray]) -> list[torch.Tensor]:
        names = [s.name for s in self.manifest.inputs]
        if self.manifest.task_mode == "task_incremental":
            names.append(TASK_INPUT)
        return [_tensor(feeds[n]) for n in [*names, LABELS_INPUT]]

    def _run(self, feeds: Mapping[str, np.ndarray]) -> list[torch.Tensor]:
        args = [
            *self._inputs(feeds),
            _tensor(np.asarray(feeds[CROSS_HEAD_INPUT], np.float32)),
            *self._keeps,
        ]
        # not cloned: the parameter outputs must alias the program's weights
        return self._train.run_method(_METHOD, args, clone_outputs=False)

    def _gradients(self, out: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(zip(self._order, out[self._grad_start : self._param_start]))

    def new_optimizer(self, lr: float) -> None:
        self._optimizer = get_sgd_optimizer(self._params, lr, self.momentum)
        self._lr = lr

    def set_learning_rate(self, lr: float) -> None:
        """ExecuTorch's SGD has no lr setter: a new optimizer (momentum restarts)."""
        if lr != self._lr:
            self.new_optimizer(lr)

    def train_step(self, feeds: Mapping[str, np.ndarray]) -> float:
        out = self._run(feeds)
        loss = float(out[0])
        self._optimizer.step(self._gradients(out))
        return loss

    def eval_step(self, feeds: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray]:
        args = [*self._inputs(feeds), *(self._params[n] for n in self._order)]
        loss, logits = self._eval.run_method(_METHOD, args)[:2]
        return float(loss), logits.numpy()

    def gradient_sums(
        self, batches: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Summed in batch order, float32, as torch accumulates `.grad` (no step)."""
        sums: dict[str, np.ndarray] = {}
        for feeds in batches:
            grads = self._gradients(self._run(feeds))
            for n in names:
                g = grads[n].numpy()
                sums[n] = g.copy() if n not in sums else sums[n] + g
        return sums

    def update_importance(
        self, grads: Mapping[str, Sequence[np.ndarray]]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
        stored = {n: self._stored[n + IMPORTANCE_SUFFIX] for n in grads}
        m = self.manifest
        return update_importance(
            grads,
            stored,
            m.importance_dtype,
            m.importance_sharpness,
            m.importance_budget,
            m.importance_decay,
            m.cross_heads,
        )

    # files --------------------------------------------------------------------------------

    def write_checkpoint(self, path: str | os.PathLike) -> None:
        save_arrays(path, {**{n: self.get(n) for n in self._order}, **self._stored})

    def export_inference(self, path: str | os.PathLike) -> None:
        """The inference program at `path`, the current weights at `path` with suffix .ptd
        (FlatTensor, keyed `model.net.P`; load both with `_load_for_executorch(pte, ptd)`).

        The weights are written first: a crash leaves at most a .ptd without its program.
        """
        path = Path(path)
        program = self._directory / INFERENCE_PROGRAM_NAME
        atomic_write(path.with_suffix(".ptd"), lambda tmp: Path(tmp).write_bytes(self._weights_ptd()))
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(program.read_bytes()))

    def _weights_ptd(self) -> bytes:
        store = NamedDataStore()
        for name in self._order:
            w = np.asarray(self.get(name), np.float32, order="C")
            layout = TensorLayout(ScalarType.FLOAT, list(w.shape), list(range(w.ndim)))
            store.add_named_data(
                PROGRAM_PARAMETER_PREFIX + name,
                w.tobytes(),
                tensor_layout=layout,
                external_tag="weights",
            )
        payload = DataPayload(buffers=store.buffers, named_data=store.external_data["weights"])
        return bytes(FlatTensorSerializer().serialize(payload))
