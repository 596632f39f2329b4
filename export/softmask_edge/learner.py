"""EdgeLearner: continual learning on a device with onnxruntime-training and numpy only.

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
import onnxruntime as ort
from softmask_format.atomic import atomic_write, recover_directory
from softmask_format.keys import task_key

from . import _ort
from .checkpoint import load_history, load_state
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
from .graphs import index_bounds
from .manifest import (
    CROSS_HEAD_INPUT,
    EVAL_MODEL_NAME,
    IMPORTANCE_MODEL_NAME,
    IMPORTANCE_SUFFIX,
    LABELS_INPUT,
    LOGITS_OUTPUT,
    MANIFEST_NAME,
    MEAN_IMPORTANCE,
    OPTIMIZER_MODEL_NAME,
    SCALE_INPUT,
    STATIC_FILES,
    TASK_INPUT,
    TRAINING_MODEL_NAME,
    Manifest,
    checkpoint_name,
    history_name,
    sha256,
)
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
def _writing(path: Path) -> Iterator[None]:
    """OS and onnxruntime write failures (disk full, read-only) -> SaveLocationError naming `path`."""
    with _ort.translated(f"cannot write {path}", SaveLocationError):
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


class EdgeLearner:
    """Load artifacts, learn tasks soft-masked, measure and accumulate their importance, save.

    SPG on the device: after a task, one raw-gradient pass (scale 0) per head
    h <= t sums ∂L_h/∂P over the task's batches; L_t is the task's cross-entropy, L_h (h < t,
    task-incremental) the sum of head h's logits. The importance-update graph turns the
    stacked sums into γ^t = max_h |tanh(standardize(g_h))| and A <- max(A, γ^t).
    A new optimizer (fresh momentum / Adam state) is created per task, as the official code.

    Args:
        directory: artifacts written by `build_artifacts` (or a previous `save`).
        seed: onnxruntime's global random seed (dropout in training graphs); None leaves it.
        threads: intra-op threads of the sessions (default: onnxruntime's choice).
    """

    def __init__(
        self, directory: str | os.PathLike, *, seed: int | None = 0, threads: int | None = None
    ) -> None:
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        self.manifest.verify_files(self.directory)  # before onnxruntime parses any byte
        if seed is not None:
            ort.set_seed(seed)
        self._options = ort.SessionOptions()
        if threads is not None:
            self._options.intra_op_num_threads = threads
        self._options.log_severity_level = 3
        # idle worker threads sleep instead of spinning: a device shares its cores with the app
        self._options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        state = load_state(self.directory, self.manifest)
        self._history = load_history(self.directory, self.manifest)
        self._scale: float | None = 1.0  # s in the session's training graph (None: rebuild)
        with self._fitting():
            self._session = _ort.TrainingSession(
                self.directory / TRAINING_MODEL_NAME,
                self.directory / EVAL_MODEL_NAME,
                self.directory / OPTIMIZER_MODEL_NAME,
                state,
                self._options,
                lr_in_graph=self.manifest.format_version >= 2,
                constants=self._constants(state, 1.0),
            )
            self._importance_session = ort.InferenceSession(
                self.directory / IMPORTANCE_MODEL_NAME,
                self._options,
                providers=["CPUExecutionProvider"],
            )
        self._optimizer_task: int | None = None
        integer = [i.name for i in self.manifest.inputs if i.dtype in ("int32", "int64")]
        self._index_bounds = index_bounds(self._session.graphs[0], integer, self.manifest.params)

    # sessions -----------------------------------------------------------------------------

    def _fitting(self) -> contextlib.AbstractContextManager[None]:
        return _ort.translated(
            f"the graphs in {str(self.directory)!r} do not fit its checkpoint",
            ArtifactMismatchError,
        )

    def _constants(self, state: Any, scale: float) -> dict[str, np.ndarray]:
        """What a session's training graph holds as constants: s, the stored A and ā."""
        names = [n + IMPORTANCE_SUFFIX for n in self.manifest.masked] + [MEAN_IMPORTANCE]
        return {
            SCALE_INPUT: np.array(scale, np.float32),
            **{n: _ort.get_parameter(state, n) for n in names},
        }

    def _use(self, scale: float) -> None:
        """Rebuild the session's training graph for `scale` unless it already runs it.

        The stored importance changes only in `end_task`, which forces the next rebuild; a
        rebuild drops the optimizer, so the next `learn_task` starts a new one. The Python
        learner reads gradients from the state, so its graphs drop the gradient outputs.
        """
        if self._scale == scale:
            return
        self._scale = None
        self._optimizer_task = None
        with self._fitting():
            self._session.specialize(
                self._constants(self._session.state, scale), gradient_outputs=False
            )
        self._scale = scale

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
        return {n: _ort.get_parameter(self._session.state, n).copy() for n in self.manifest.params}

    def importance(self) -> dict[str, np.ndarray]:
        """Accumulated importance A (float32) of every masked parameter."""
        return {
            n: decode(_ort.get_parameter(self._session.state, n + IMPORTANCE_SUFFIX))
            for n in self.manifest.masked
        }

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
            with _ort.translated(f"learn_task({t})"):
                return self._train(t, prepared, val, float(lr), early_stopping, int(epochs), start)
        except BaseException:
            # a batch onnxruntime refuses mid-pass (e.g. longer than the position table): the
            # weights go back to where the call started, and the task's optimizer restarts
            for n, w in start.items():
                _ort.set_parameter(self._session.state, n, w)
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
        if self._optimizer_task != t:
            self._session.new_optimizer(lr)
            self._optimizer_task = t
        self._session.set_learning_rate(lr)
        plateau = Plateau(early_stopping or EarlyStopping(), lr)
        best = start  # the weights the call started from, until validation improves
        losses: list[float] = []
        self.validation_losses: list[float] = []
        for _ in range(epochs):
            total = 0.0
            for feeds in prepared:
                self._session.reset_gradients()
                total += float(self._session.run(feeds, training=True)[0])
                self._session.optimizer_step()
            losses.append(total / len(prepared))
            if val is None:
                continue
            val_loss = sum(float(self._session.run(f, training=False)[0]) for f in val) / len(val)
            self.validation_losses.append(val_loss)
            improved, stop = plateau.update(val_loss)
            if improved:
                best = self.parameters()
            if stop:
                break
            self._session.set_learning_rate(plateau.lr)
        if val is not None:
            for n, w in best.items():
                _ort.set_parameter(self._session.state, n, w)
        return losses

    def end_task(self, batches: Iterable[Any], name: str | None = None) -> dict[str, np.ndarray]:
        """Measure the finished task's importance and max-accumulate it; return it (float32)."""
        t = self._next_task(None)
        batches = _reiterable(batches)
        if not batches:
            raise EmptyDataError(f"the importance pass of task {t} got no batches")
        own = [self._feeds(b, t, cross_head=False) for b in batches]
        self._use(0.0)
        with _ort.translated(f"end_task({t})"):
            return self._measure(t, batches, own, name)

    def _measure(
        self, t: int, batches: list[Any], own: list[dict[str, np.ndarray]], name: str | None
    ) -> dict[str, np.ndarray]:
        heads = range(t + 1) if self.manifest.task_mode == "task_incremental" else [t]
        sums: dict[str, list[np.ndarray]] = {n: [] for n in self.manifest.masked}
        for h in heads:
            self._session.reset_gradients()
            for batch, feeds in zip(batches, own):
                if h != t:
                    feeds = self._feeds(batch, h, cross_head=True)
                self._session.run(feeds, training=True)
            for n in self.manifest.masked:
                sums[n].append(_ort.get_gradient(self._session.state, n).copy())
        bad = sorted(n for n, gs in sums.items() if not all(np.isfinite(g).all() for g in gs))
        if bad:
            raise NonFiniteGradientError(
                f"importance of task {t}: NaN/Inf gradients in {', '.join(bad[:10])}"
            )
        feeds = {}
        for n in self.manifest.masked:
            feeds[n + ".grads"] = np.stack(sums[n])
            feeds[n + IMPORTANCE_SUFFIX] = _ort.get_parameter(
                self._session.state, n + IMPORTANCE_SUFFIX
            )
        names = [o.name for o in self._importance_session.get_outputs()]
        out = dict(zip(names, self._importance_session.run(names, feeds)))
        state = self._session.state
        for n in self.manifest.masked:
            _ort.set_parameter(
                state, n + IMPORTANCE_SUFFIX, out[n + IMPORTANCE_SUFFIX + ".updated"]
            )
            self._history[task_key(t, n)] = out[n + ".task_importance"]
        _ort.set_parameter(state, MEAN_IMPORTANCE, out[MEAN_IMPORTANCE + ".updated"])
        self._scale = None  # the session's constants hold the old importance
        task_names = [*self.manifest.task_names[:t], name or f"task_{t}"]
        self.manifest = replace(self.manifest, num_tasks=t + 1, task_names=task_names)
        self._optimizer_task = None
        return {n: decode(out[n + ".task_importance"]) for n in self.manifest.masked}

    # inference ----------------------------------------------------------------------------

    def predict(self, inputs: Any, task_id: int | None = None) -> np.ndarray:
        """Logits of head `task_id` (task-incremental; default the latest learned) in eval mode."""
        head = self._head_for(task_id)
        feeds, (_, batch_size) = self._inputs((inputs, None))
        feeds[LABELS_INPUT] = np.zeros(batch_size, np.int64)
        feeds[CROSS_HEAD_INPUT] = np.array(0.0, np.float32)
        if self.manifest.task_mode == "task_incremental":
            feeds[TASK_INPUT] = np.array(head, np.int64)
        with _ort.translated("predict"):
            return self._session.run(feeds, training=False)[1]

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
                for name in STATIC_FILES:
                    src = self.directory / name
                    with _writing(target / name):
                        atomic_write(target / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
            with _writing(ckpt):
                atomic_write(ckpt, lambda tmp: _ort.save_checkpoint(self._session.state, tmp))
            with _writing(hist):
                write_history(hist, self._history)
            with _writing(target / MANIFEST_NAME):
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
            for n in STATIC_FILES
            if not (target / n).is_file() or sha256(target / n) != sha256(self.directory / n)
        ]
        if differing:
            raise ArtifactMismatchError(
                f"cannot save into {str(target)!r}: it holds artifacts of another export "
                f"({', '.join(differing)} differ); save into an empty folder"
            )
        return max(current["generation"], self.manifest.generation) + 1

    def export_inference(self, path: str | os.PathLike) -> Path:
        """Write an inference-only ONNX model (inputs [+ task_id] -> logits), atomically.

        Refuses a path onto a file of the loaded artifacts folder (its graphs, manifest and
        generation files), which the model would overwrite.
        """
        path = Path(path)
        if path.parent.resolve() == self.directory.resolve() and (
            path.name in (*STATIC_FILES, MANIFEST_NAME) or _GENERATION_FILE.match(path.name)
        ):
            raise SaveLocationError(
                f"export_inference({str(path)!r}) would overwrite a file of the artifacts "
                "folder; write the inference model elsewhere (e.g. model.onnx)"
            )
        with _ort.translated(f"export_inference({str(path)!r})", SaveLocationError):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda tmp: self._session.export_inference(tmp, [LOGITS_OUTPUT]))
            except OSError as e:
                raise SaveLocationError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
        return path
