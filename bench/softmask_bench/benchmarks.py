"""Continual-learning benchmarks built from data that ships with installed packages.

Every builder is deterministic given `seed` and returns train / validation / test splits per
task; the test images of a benchmark never appear in any task's train or validation split.

* Split-Digits: sklearn `load_digits` (1,797 8x8 images), classes (0,1), (2,3), ..., (8,9);
  labels re-indexed to 0/1 inside each task.
* Permuted-Digits: all 10 classes, task k sees the images through a fixed random pixel
  permutation drawn from `seed` (task 0 included). One image split is shared by all tasks, so
  a test image is a test image under every permutation.
* Split-MNIST1D: `mnist1d.make_dataset(get_dataset_args())` (procedural, never its download
  helper), its own 4,000 / 1,000 train / test split, 5 tasks x 2 classes as Split-Digits.
* Rotated-Digits: all 10 classes, task k sees every image rotated by k · 180° / num_tasks
  (bilinear, 8x8 kept), a sequence of related domains.
* Permuted-MNIST1D: all 10 classes of MNIST-1D, task k through a fixed random permutation of
  the 40 samples (task 0 included).

The long-horizon protocols use `num_tasks` = 20 (`--tasks 20` on the command line).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from softmask_peft.errors import ConfigError

SCENARIOS = ("task", "domain")
SCENARIO_TITLES = {
    "task": "task-incremental (task id given at test time, one head per task)",
    "domain": "domain-incremental (no task id at test time, one shared head)",
}


@dataclass(frozen=True)
class Split:
    """Inputs (N, *input_shape) float32 and integer labels (N,)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Task:
    name: str
    num_classes: int
    train: Split
    val: Split
    test: Split


@dataclass(frozen=True)
class Benchmark:
    """A task sequence; `default_scenario` is the scenario the benchmark is usually reported in."""

    name: str
    tasks: list[Task]
    input_shape: tuple[int, ...]
    default_scenario: str

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        """Classes of the shared head in the domain-incremental scenario."""
        return max(t.num_classes for t in self.tasks)


def _split_indices(
    y: np.ndarray, fractions: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, ...]:
    """Stratified split of indices into (train, val, test) with val/test fractions per class."""
    val_frac, test_frac = fractions
    parts: tuple[list[np.ndarray], ...] = ([], [], [])
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = round(len(idx) * test_frac)
        n_val = round(len(idx) * val_frac)
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test : n_test + n_val])
        parts[0].append(idx[n_test + n_val :])
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def _tensor_split(x: np.ndarray, y: np.ndarray, shape: tuple[int, ...]) -> Split:
    return Split(
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(len(x), *shape),
        torch.from_numpy(y.astype(np.int64)),
    )


def _class_split_tasks(
    prefix: str,
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
    shape: tuple[int, ...],
    classes_per_task: int = 2,
) -> list[Task]:
    """Tasks of consecutive class pairs; labels become 0..classes_per_task-1 inside a task."""
    classes = np.unique(parts["train"][1])
    tasks = []
    for k in range(len(classes) // classes_per_task):
        chosen = classes[k * classes_per_task : (k + 1) * classes_per_task]
        splits = {}
        for part, (x, y) in parts.items():
            keep = np.isin(y, chosen)
            splits[part] = _tensor_split(x[keep], np.searchsorted(chosen, y[keep]), shape)
        name = f"{prefix}{'/'.join(str(c) for c in chosen)}"
        tasks.append(Task(name, classes_per_task, splits["train"], splits["val"], splits["test"]))
    return tasks


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data / 16.0, d.target


def split_digits(
    seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.2
) -> Benchmark:
    """Split-Digits: 5 tasks x 2 classes from sklearn's bundled digits (task-incremental)."""
    x, y = _digits()
    rng = np.random.default_rng(seed)
    tr, va, te = _split_indices(y, (val_fraction, test_fraction), rng)
    parts = {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}
    tasks = _class_split_tasks("digits ", parts, (1, 8, 8))
    return Benchmark("split-digits", tasks, (1, 8, 8), "task")


def _digit_domains(
    name: str,
    num_tasks: int,
    seed: int,
    fractions: tuple[float, float],
    view: Callable[[np.ndarray, np.random.Generator, int], tuple[str, np.ndarray]],
) -> Benchmark:
    """All 10 digit classes seen through `view(x, rng, k)` -> (task name, images) per task k;
    one train / val / test split shared by every task (drawn before the views)."""
    if num_tasks < 1:
        raise ConfigError(f"num_tasks must be >= 1, got {num_tasks}")
    x, y = _digits()
    rng = np.random.default_rng(seed)
    tr, va, te = _split_indices(y, fractions, rng)
    tasks = []
    for k in range(num_tasks):
        task_name, xv = view(x, rng, k)
        splits = [_tensor_split(xv[i], y[i], (1, 8, 8)) for i in (tr, va, te)]
        tasks.append(Task(task_name, 10, *splits))
    return Benchmark(name, tasks, (1, 8, 8), "domain")


def permuted_digits(
    seed: int = 0, num_tasks: int = 10, val_fraction: float = 0.15, test_fraction: float = 0.2
) -> Benchmark:
    """Permuted-Digits: `num_tasks` fixed pixel permutations of all 10 digit classes."""

    def permute(x: np.ndarray, rng: np.random.Generator, k: int) -> tuple[str, np.ndarray]:
        return f"permutation {k}", x[:, rng.permutation(x.shape[1])]

    return _digit_domains(
        "permuted-digits", num_tasks, seed, (val_fraction, test_fraction), permute
    )


def rotated_digits(
    seed: int = 0, num_tasks: int = 20, val_fraction: float = 0.15, test_fraction: float = 0.2
) -> Benchmark:
    """Rotated-Digits: `num_tasks` rotations (k · 180° / num_tasks) of all 10 digit classes."""
    from scipy.ndimage import rotate

    def turn(x: np.ndarray, rng: np.random.Generator, k: int) -> tuple[str, np.ndarray]:
        angle = 180.0 * k / num_tasks
        xr = rotate(x.reshape(-1, 8, 8), angle, axes=(1, 2), reshape=False, order=1)
        return f"rotation {angle:g}", np.clip(xr, 0.0, 1.0).reshape(len(x), 64)

    return _digit_domains("rotated-digits", num_tasks, seed, (val_fraction, test_fraction), turn)


def permuted_mnist1d(seed: int = 0, num_tasks: int = 20, val_fraction: float = 0.15) -> Benchmark:
    """Permuted-MNIST1D: `num_tasks` fixed permutations of MNIST-1D's 40 samples, 10 classes."""
    if num_tasks < 1:
        raise ConfigError(f"num_tasks must be >= 1, got {num_tasks}")
    x, y, x_test, y_test = _mnist1d()
    rng = np.random.default_rng(seed)
    tr, va, _ = _split_indices(y, (val_fraction, 0.0), rng)
    tasks = []
    for k in range(num_tasks):
        perm = rng.permutation(x.shape[1])
        splits = [
            _tensor_split(x[tr][:, perm], y[tr], (1, 40)),
            _tensor_split(x[va][:, perm], y[va], (1, 40)),
            _tensor_split(x_test[:, perm], y_test, (1, 40)),
        ]
        tasks.append(Task(f"permutation {k}", 10, *splits))
    return Benchmark("permuted-mnist1d", tasks, (1, 40), "domain")


@lru_cache(maxsize=1)
def _mnist1d() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The standard MNIST-1D data, generated procedurally (mnist1d seeds numpy's global RNG;
    its state is restored afterwards so callers' randomness is untouched)."""
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


def split_mnist1d(seed: int = 0, val_fraction: float = 0.15) -> Benchmark:
    """Split-MNIST1D: 5 tasks x 2 classes; validation carved from MNIST-1D's train split."""
    x, y, x_test, y_test = _mnist1d()
    rng = np.random.default_rng(seed)
    tr, va, _ = _split_indices(y, (val_fraction, 0.0), rng)
    parts = {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x_test, y_test)}
    tasks = _class_split_tasks("mnist1d ", parts, (1, 40))
    return Benchmark("split-mnist1d", tasks, (1, 40), "task")


BENCHMARKS: dict[str, Callable[..., Benchmark]] = {
    "split-digits": split_digits,
    "permuted-digits": permuted_digits,
    "split-mnist1d": split_mnist1d,
    "rotated-digits": rotated_digits,
    "permuted-mnist1d": permuted_mnist1d,
}
# benchmarks whose length is a choice (`num_tasks`); the split-* ones have 5 tasks by their classes
SEQUENCES = ("permuted-digits", "rotated-digits", "permuted-mnist1d")


def get_benchmark(name: str, seed: int = 0, num_tasks: int | None = None) -> Benchmark:
    """Build benchmark `name` for `seed` (`num_tasks` for the sequences of SEQUENCES; None: the
    builder's default); unknown names raise a ConfigError listing the choices."""
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    if num_tasks is None:
        return BENCHMARKS[name](seed)
    if name not in SEQUENCES:
        raise ConfigError(
            f"{name} has a fixed number of tasks; --tasks applies to {', '.join(SEQUENCES)}"
        )
    return BENCHMARKS[name](seed, num_tasks=num_tasks)
