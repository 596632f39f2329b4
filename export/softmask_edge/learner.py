"""EdgeLearner: continual learning on a device with numpy and one runtime (no torch needed for
ONNX Runtime; ExecuTorch's Python bindings bring their own torch).

    learner = EdgeLearner("artifacts/")
    learner.learn_task(batches, epochs=3, lr=0.05)   # masked by the accumulated importance
    learner.end_task(batches)                        # raw-gradient pass + importance update graph
    learner.save("artifacts/")                       # atomic; the next task starts from here
    learner.export_inference("model.onnx")

A batch is `(x, y)` with `x` an array (single-input graphs) or a mapping input name -> array,
or a mapping holding the inputs and `"labels"`. Labels are integer class indices.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from softmask_format.atomic import atomic_write, recover_directory
from softmask_format.keys import task_key

from .checkpoint import load_history
from .errors import (
    ArgumentError,
    ArtifactMismatchError,
    BatchError,
    EmptyDataError,
    NonFiniteGradientError,
    SaveLocationError,
    StaleWriterError,
    TaskOrderError,
)
from .manifest import (
    CROSS_HEAD_INPUT,
    IMPORTANCE_SUFFIX,
    LABELS_INPUT,
    MANIFEST_NAME,
    MEAN_IMPORTANCE,
    TASK_INPUT,
    Manifest,
    checkpoint_name,
    history_name,
    sha256,
)
from .runtime import Runtime
from .schedule import EarlyStopping, Plateau
from .storage import decode, write_history

_GENERATION_FILE = re.compile(r"^(checkpoint-\d{6}|importance_history-\d{6}\.npz)$")
_STALE_TEMP = re.compile(r"^\.(checkpoint-\d{6}|importance_history-\d{6}\.npz)\..*\.tmp$")


def _reiterable(batches: Iterable[Any]) -> list[Any]:
    return batches if isinstance(batches, list) else list(batches)


def _check_labels(y: Any, batch_size: int, num_classes: int) -> np.ndarray:
    """Integer class indices of the right length and range, as int64."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise BatchError(f"labels must be integer class indices, got dtype {y.dtype}")
    if y.shape != (batch_size,):
        raise BatchError(f"labels must have shape ({batch_size},), got {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise BatchError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


@contextlib.contextmanager
def _writing(runtime: Runtime, path: Path) -> Iterator[None]:
    """OS and runtime write failures (disk full, read-only) -> SaveLocationError naming `path`."""
    with runtime.translated(f"cannot write {path}", SaveLocationError):
        try:
            yield
        except OSError as e:
            raise SaveLocationError(
                f"cannot write {path}: {e.strerror or e}; the folder keeps its current generation"
            ) from e


def _remove(*paths: Path) -> None:
    """Best-effort removal of files no manifest names (a failure leaves only clutter)."""
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def open_runtime(
    directory: Path, manifest: Manifest, seed: int | None, threads: int | None, momentum: float
) -> Runtime:
    """The runtime the artifacts were exported for (`Manifest.runtime`)."""
    if manifest.runtime == "executorch":
        from .executorch_runtime import ExecuTorchRuntime  # its bindings import torch

        return ExecuTorchRuntime(directory, manifest, seed, threads, momentum)
    if momentum:
        raise ArgumentError(
            "momentum is an ExecuTorch learner option; ONNX Runtime artifacts carry their "
            f"optimizer in the graph ({manifest.optimizer!r})"
        )
    from .availability import require_onnx_runtime

    require_onnx_runtime()  # onnxruntime-training: not needed for ExecuTorch
    from .ort_runtime import OrtRuntime

    return OrtRuntime(directory, manifest, seed, threads)


class EdgeLearner:
    """Load artifacts, learn tasks soft-masked, measure and accumulate their importance, save.

    SPG on the device: after a task, one raw-gradient pass (scale 0) per head
    h <= t sums ∂L_h/∂P over the task's batches; L_t is the task's cross-entropy, L_h (h < t,
    task-incremental) the sum of head h's logits. The importance update turns the stacked
    sums into γ^t = max_h |tanh(standardize(g_h))| and A <- max(A, γ^t).
    A new optimizer (fresh momentum / Adam state) is created per task, as the official code.
    The runtime (ONNX Runtime Training or ExecuTorch) is the one the folder was exported for;
    everything else here is shared by both (`runtime.Runtime` is the cut).

    Args:
        directory: artifacts written by `build_artifacts` / `export_for_device` (or a `save`).
        seed: the runtime's random seed (dropout in training graphs); None leaves it.
        threads: intra-op threads of the sessions (default: the runtime's choice).
        momentum: SGD momentum of the ExecuTorch runtime's optimizer (torch.optim.SGD's
            formula, dampening 0); ONNX Runtime artifacts fix their optimizer at export.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        seed: int | None = 0,
        threads: int | None = None,
        momentum: float = 0.0,
    ) -> None:
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        self.manifest.verify_files(self.directory)  # before a runtime parses any byte
        self._history = load_history(self.directory, self.manifest)
        self._runtime = open_runtime(self.directory, self.manifest, seed, threads, momentum)
        self._optimizer_task: int | None = None
        self._index_bounds = self._runtime.index_bounds

    @property
    def runtime(self) -> str:
        """"onnxruntime" or "executorch": what the loaded artifacts run on."""
        return self.manifest.runtime

    def _use(self, scale: float) -> None:
        """Train with keep = 1 − scale·A; a rebuilt session needs a new optimizer."""
        if self._runtime.use_scale(scale):
            self._optimizer_task = None

    # batches ------------------------------------------------------------------------------

    def _inputs(self, batch: Any) -> tuple[dict[str, np.ndarray], Any]:
        if isinstance(batch, Mapping):
            if LABELS_INPUT not in batch:
                raise BatchError(f"a mapping batch needs a {LABELS_INPUT!r} entry")
            x, y = {k: v for k, v in batch.items() if k != LABELS_INPUT}, batch[LABELS_INPUT]
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, y = batch
        else:
            raise BatchError(
                f"a batch must be (inputs, labels) or a mapping, got {type(batch).__name__}"
            )
        specs = self.manifest.inputs
        if not isinstance(x, Mapping):
            if len(specs) != 1:
                raise BatchError(
                    f"the graph takes {len(specs)} inputs; pass a mapping of {[s.name for s in specs]}"
                )
            x = {specs[0].name: x}
        missing = [s.name for s in specs if s.name not in x]
        unexpected = sorted(set(x) - {s.name for s in specs})
        if missing or unexpected:
            raise BatchError(f"batch inputs: missing {missing}, unexpected {unexpected}")
        feeds, batch_size = {}, None
        for s in specs:
            a = np.asarray(x[s.name])
            if a.dtype != np.dtype(s.dtype):
                raise BatchError(
                    f"input {s.name!r}: dtype {a.dtype}, the graph needs {s.dtype} (use .astype)"
                )
            bad_dims = len(a.shape) != len(s.shape) or any(
                d is not None and d != n for d, n in zip(s.shape, a.shape)
            )
            if bad_dims:
                want = ["?" if d is None else d for d in s.shape]
                raise BatchError(f"input {s.name!r}: shape {list(a.shape)} does not match {want}")
            if batch_size is not None and a.shape[0] != batch_size:
                raise BatchError(
                    f"inputs disagree on the batch size ({batch_size} vs {a.shape[0]})"
                )
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                raise BatchError(f"input {s.name!r} holds NaN or Inf values")
            rows = self._index_bounds.get(s.name)
            if rows is not None and a.size and (a.min() < 0 or a.max() >= rows):
                raise BatchError(
                    f"input {s.name!r} holds ids in [{a.min()}, {a.max()}]; the table it "
                    f"indexes has {rows} rows, so ids must lie in [0, {rows})"
                )
            batch_size = a.shape[0]
            feeds[s.name] = np.ascontiguousarray(a)
        if batch_size == 0:  # onnxruntime's mean cross-entropy divides by it: SIGFPE, no exception
            raise BatchError("a batch needs at least one row, got 0")
        limit = self._runtime.max_batch
        if limit is not None and batch_size > limit:
            raise BatchError(
                f"a batch may have at most {limit} rows (the program was exported with "
                f"max_batch={limit}), got {batch_size}: split it or export with a larger max_batch"
            )
        return feeds, (y, batch_size)

    def _feeds(self, batch: Any, head: int, *, cross_head: bool) -> dict[str, np.ndarray]:
        feeds, (y, batch_size) = self._inputs(batch)
        classes = self.manifest.task_classes(head)
        feeds[LABELS_INPUT] = (
            np.zeros(batch_size, np.int64) if cross_head else _check_labels(y, batch_size, classes)
        )
        feeds[CROSS_HEAD_INPUT] = np.array(1.0 if cross_head else 0.0, np.float32)
        if self.manifest.task_mode == "task_incremental":
            feeds[TASK_INPUT] = np.array(head, np.int64)
        return feeds

    def _next_task(self, task_id: int | None) -> int:
        t = self.manifest.num_tasks
        if task_id is not None and task_id != t:
            raise TaskOrderError(f"the next task is {t} ({t} finished), got task_id={task_id}")
        declared = self.manifest.declared_tasks()
        if declared >= 0 and t >= declared:
            raise TaskOrderError(
                f"all {declared} declared heads are used; declare more heads at export time"
            )
        return t

    # state --------------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        """Finished tasks (exported ones included)."""
        return self.manifest.num_tasks

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of the trainable weights, keyed by the framework's parameter names."""
        return {n: self._runtime.get(n).copy() for n in self.manifest.params}

    def importance(self) -> dict[str, np.ndarray]:
        """Accumulated importance A (float32) of every masked parameter."""
        return {n: decode(self._runtime.get(n + IMPORTANCE_SUFFIX)) for n in self.manifest.masked}

    def task_importance(self, task_id: int) -> dict[str, np.ndarray]:
        """Importance of task `task_id` alone (float32)."""
        if not 0 <= task_id < self.num_tasks:
            raise TaskOrderError(f"no importance for task {task_id}: {self.num_tasks} recorded")
        return {n: decode(self._history[task_key(task_id, n)]) for n in self.manifest.masked}

    # training -----------------------------------------------------------------------------

    def learn_task(
        self,
        batches: Iterable[Any],
        epochs: int = 1,
        lr: float = 0.05,
        task_id: int | None = None,
        masked: bool = True,
        validation: Iterable[Any] | None = None,
        early_stopping: EarlyStopping | None = None,
    ) -> list[float]:
        """Train the next task soft-masked (keep = 1 − A, heads 1 − ā); return mean loss per epoch.

        `masked=False` trains with scale 0: plain fine-tuning, the baseline soft-masking is
        judged by (switching `masked` within a task starts a new optimizer, as an lr change
        does: AdamW's moments restart; the JS learner does the same).
        With `validation` batches of the task, `epochs` is a maximum: the lr decays on plateaus
        of the validation loss, training stops early and the best weights are kept
        (`early_stopping`, default `EarlyStopping()`); `validation_losses` lists the losses.
        """
        t = self._next_task(task_id)
        batches = _reiterable(batches)
        if not batches:
            raise EmptyDataError(f"learn_task({t}) got no batches")
        real = isinstance(lr, numbers.Real) and not isinstance(lr, bool)
        valid_lr = real and math.isfinite(lr) and lr > 0
        whole = isinstance(epochs, numbers.Integral) and not isinstance(epochs, bool)
        if not (whole and epochs >= 1 and valid_lr):
            raise ArgumentError(
                f"epochs must be an int >= 1 and lr a finite number > 0, got epochs={epochs!r}, "
                f"lr={lr!r}"
            )
        # every batch is checked before the first step, so a bad one changes nothing
        prepared = [self._feeds(b, t, cross_head=False) for b in batches]
        val = None
        if validation is not None:
            val = [self._feeds(b, t, cross_head=False) for b in _reiterable(validation)]
            if not val:
                raise EmptyDataError(f"learn_task({t}) got an empty validation set")
        self._use(1.0 if masked else 0.0)
        start = self.parameters()
        try:
            with self._runtime.translated(f"learn_task({t})"):
                return self._train(t, prepared, val, float(lr), early_stopping, int(epochs), start)
        except BaseException:
            # a batch the runtime refuses mid-pass (e.g. longer than the position table): the
            # weights go back to where the call started, and the task's optimizer restarts
            self._runtime.set(start)
            self._optimizer_task = None
            raise

    def _train(
        self,
        t: int,
        prepared: list[dict[str, np.ndarray]],
        val: list[dict[str, np.ndarray]] | None,
        lr: float,
        early_stopping: EarlyStopping | None,
        epochs: int,
        start: dict[str, np.ndarray],
    ) -> list[float]:
        runtime = self._runtime
        if self._optimizer_task != t:
            runtime.new_optimizer(lr)
            self._optimizer_task = t
        runtime.set_learning_rate(lr)
        plateau = Plateau(early_stopping or EarlyStopping(), lr)
        best = start  # the weights the call started from, until validation improves
        losses: list[float] = []
        self.validation_losses: list[float] = []
        for _ in range(epochs):
            total = 0.0
            for feeds in prepared:
                total += runtime.train_step(feeds)
            losses.append(total / len(prepared))
            if val is None:
                continue
            val_loss = sum(runtime.eval_step(f)[0] for f in val) / len(val)
            self.validation_losses.append(val_loss)
            improved, stop = plateau.update(val_loss)
            if improved:
                best = self.parameters()
            if stop:
                break
            runtime.set_learning_rate(plateau.lr)
        if val is not None:
            runtime.set(best)
        return losses

    def end_task(self, batches: Iterable[Any], name: str | None = None) -> dict[str, np.ndarray]:
        """Measure the finished task's importance and max-accumulate it; return it (float32)."""
        t = self._next_task(None)
        batches = _reiterable(batches)
        if not batches:
            raise EmptyDataError(f"the importance pass of task {t} got no batches")
        own = [self._feeds(b, t, cross_head=False) for b in batches]
        self._use(0.0)
        with self._runtime.translated(f"end_task({t})"):
            return self._measure(t, batches, own, name)

    def _measure(
        self, t: int, batches: list[Any], own: list[dict[str, np.ndarray]], name: str | None
    ) -> dict[str, np.ndarray]:
        heads = range(t + 1) if self.manifest.task_mode == "task_incremental" else [t]
        sums: dict[str, list[np.ndarray]] = {n: [] for n in self.manifest.masked}
        for h in heads:
            feeds = own if h == t else [self._feeds(b, h, cross_head=True) for b in batches]
            for n, g in self._runtime.gradient_sums(feeds, self.manifest.masked).items():
                sums[n].append(g)
        bad = sorted(n for n, gs in sums.items() if not all(np.isfinite(g).all() for g in gs))
        if bad:
            raise NonFiniteGradientError(
                f"importance of task {t}: NaN/Inf gradients in {', '.join(bad[:10])}"
            )
        task, updated, mean = self._runtime.update_importance(sums)
        self._runtime.set(
            {**{n + IMPORTANCE_SUFFIX: a for n, a in updated.items()}, MEAN_IMPORTANCE: mean}
        )
        for n in self.manifest.masked:
            self._history[task_key(t, n)] = task[n]
        task_names = [*self.manifest.task_names[:t], name or f"task_{t}"]
        self.manifest = replace(self.manifest, num_tasks=t + 1, task_names=task_names)
        self._optimizer_task = None
        return {n: decode(task[n]) for n in self.manifest.masked}

    # inference ----------------------------------------------------------------------------

    def predict(self, inputs: Any, task_id: int | None = None) -> np.ndarray:
        """Logits of head `task_id` (task-incremental; default the latest learned) in eval mode."""
        head = self._head_for(task_id)
        feeds, (_, batch_size) = self._inputs((inputs, None))
        feeds[LABELS_INPUT] = np.zeros(batch_size, np.int64)
        feeds[CROSS_HEAD_INPUT] = np.array(0.0, np.float32)
        if self.manifest.task_mode == "task_incremental":
            feeds[TASK_INPUT] = np.array(head, np.int64)
        with self._runtime.translated("predict"):
            return self._runtime.eval_step(feeds)[1]

    def evaluate(self, batches: Iterable[Any], task_id: int | None = None) -> float:
        """Accuracy of head `task_id` on `(x, y)` batches."""
        correct = total = 0
        for batch in batches:
            x, y = (batch, batch[LABELS_INPUT]) if isinstance(batch, Mapping) else batch
            if isinstance(x, Mapping):
                x = {k: v for k, v in x.items() if k != LABELS_INPUT}
            pred = self.predict(x, task_id).argmax(axis=-1)
            y = _check_labels(y, len(pred), self.manifest.task_classes(self._head_for(task_id)))
            correct += int((pred == y).sum())
            total += len(pred)
        if total == 0:
            raise EmptyDataError("evaluate() got no batches")
        return correct / total

    def _head_for(self, task_id: int | None) -> int:
        if self.manifest.task_mode == "shared_head":
            return 0
        head = max(self.num_tasks - 1, 0) if task_id is None else task_id
        if not 0 <= head < len(self.manifest.head_classes):
            raise TaskOrderError(f"no head {head}: {len(self.manifest.head_classes)} declared")
        return head

    # persistence --------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike | None = None) -> Path:
        """Write weights and importance as a new generation, then switch the manifest to it.

        One writer per folder. Files the current manifest names are never overwritten: the new
        generation gets new file names, the manifest is replaced last and atomically, and the
        previous generation's files are removed afterwards, so a crash at any point leaves a
        loadable folder. A learner whose loaded generation is no longer the folder's current
        one (another writer saved since) is refused with `StaleWriterError`. A failed write
        (disk full, read-only) raises `SaveLocationError` and leaves no new file behind.
        """
        target = self.directory if directory is None else Path(directory)
        if target.exists() and not target.is_dir():
            raise SaveLocationError(f"cannot save into {str(target)!r}: not a directory")
        try:
            target.mkdir(parents=True, exist_ok=True)
            same = target.resolve() == self.directory.resolve()
            recover_directory(target, drop_uncommitted=True)  # leftovers of a killed export
        except OSError as e:
            raise SaveLocationError(f"cannot save into {str(target)!r}: {e.strerror or e}") from e
        generation = self._next_generation(target, same)
        ckpt, hist = target / checkpoint_name(generation), target / history_name(generation)
        switched = False
        try:
            if not same and Manifest.peek(target) is None:
                for name in self.manifest.static_files():
                    src = self.directory / name
                    with _writing(self._runtime, target / name):
                        atomic_write(target / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
            with _writing(self._runtime, ckpt):
                atomic_write(ckpt, self._runtime.write_checkpoint)
            with _writing(self._runtime, hist):
                write_history(hist, self._history)
            with _writing(self._runtime, target / MANIFEST_NAME):
                manifest = replace(
                    self.manifest,
                    generation=generation,
                    checkpoint=ckpt.name,
                    checkpoint_sha256=sha256(ckpt),
                    history=hist.name,
                    history_sha256=sha256(hist),
                )
                manifest.save(target)
            switched = True
        finally:
            if not switched:  # an error or an interrupt: the folder keeps its generation
                _remove(ckpt, hist)
        self.manifest, self.directory = manifest, target
        _remove(
            *(
                item
                for item in target.iterdir()
                if _STALE_TEMP.match(item.name)
                or (_GENERATION_FILE.match(item.name) and item.name not in (ckpt.name, hist.name))
            )
        )
        return target

    def _next_generation(self, target: Path, same: bool) -> int:
        """The generation a save writes; refuses a stale writer and a folder of another export.

        Into its own folder a learner may only save if the folder is still at the generation
        it loaded; into another folder holding artifacts only if that folder has the same
        graphs, and then above that folder's generation.
        """
        current = Manifest.peek(target)
        if current is None:
            return self.manifest.generation + 1
        if same:
            if (current["generation"], current.get("export_id", "")) != (
                self.manifest.generation,
                self.manifest.export_id,
            ):
                raise StaleWriterError(
                    f"{str(target)!r} is at generation {current['generation']} but this learner "
                    f"loaded generation {self.manifest.generation}: another writer saved since. "
                    "One writer per folder: reload the folder (EdgeLearner(folder)) and redo "
                    "the work, or save into a new folder"
                )
            return self.manifest.generation + 1
        differing = [
            n
            for n in self.manifest.static_files()
            if not (target / n).is_file() or sha256(target / n) != sha256(self.directory / n)
        ]
        if differing:
            raise ArtifactMismatchError(
                f"cannot save into {str(target)!r}: it holds artifacts of another export "
                f"({', '.join(differing)} differ); save into an empty folder"
            )
        return max(current["generation"], self.manifest.generation) + 1

    def export_inference(self, path: str | os.PathLike) -> Path:
        """Write an inference-only model (inputs [+ task_id] -> logits), atomically: ONNX, or
        for ExecuTorch a `.pte` program and its weights in `path` with the suffix `.ptd`.

        Refuses a path onto a file of the loaded artifacts folder (its graphs, manifest and
        generation files), which the model would overwrite.
        """
        path = Path(path)
        taken = (*self.manifest.static_files(), MANIFEST_NAME)
        if path.parent.resolve() == self.directory.resolve() and any(
            name in taken or _GENERATION_FILE.match(name)
            for name in (path.name, path.with_suffix(".ptd").name)
        ):
            raise SaveLocationError(
                f"export_inference({str(path)!r}) would overwrite a file of the artifacts "
                "folder; write the inference model elsewhere (e.g. model.onnx)"
            )
        with self._runtime.translated(f"export_inference({str(path)!r})", SaveLocationError):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._runtime.export_inference(path)
            except OSError as e:
                raise SaveLocationError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
        return path
