"""Benchmark builders: class splits, fixed permutations, no test leakage, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from softmask_bench.benchmarks import (
    get_benchmark,
    permuted_digits,
    split_digits,
    split_mnist1d,
)

from softmask_peft.errors import ConfigError


@pytest.fixture(scope="module")
def digits_index() -> tuple[dict[bytes, int], np.ndarray]:
    """Row bytes of each original image (scaled like the builders) -> its index; targets."""
    d = load_digits()
    rows = (d.data / 16.0).astype(np.float32)
    return {r.tobytes(): i for i, r in enumerate(rows)}, d.target


def _indices(split, index: dict[bytes, int]) -> list[int]:
    return [index[r.tobytes()] for r in split.x.reshape(len(split), -1).numpy()]


def test_split_digits_classes_labels_and_splits(digits_index) -> None:
    index, target = digits_index
    bench = split_digits(seed=0)
    assert bench.num_tasks == 5 and bench.input_shape == (1, 8, 8)
    assert bench.default_scenario == "task"
    all_idx: dict[str, set[int]] = {"train": set(), "val": set(), "test": set()}
    for k, task in enumerate(bench.tasks):
        for part in ("train", "val", "test"):
            split = getattr(task, part)
            idx = _indices(split, index)
            assert set(target[idx]) == {2 * k, 2 * k + 1}, "each task holds its own class pair"
            assert torch.equal(split.y, torch.as_tensor(target[idx] - 2 * k))
            assert not all_idx[part] & set(idx)
            all_idx[part] |= set(idx)
    assert not all_idx["test"] & (all_idx["train"] | all_idx["val"]), "test leaked into train/val"
    assert not all_idx["train"] & all_idx["val"]
    assert len(all_idx["train"] | all_idx["val"] | all_idx["test"]) == len(target)
    assert len(all_idx["test"]) == pytest.approx(0.2 * len(target), abs=10)


def test_builders_are_deterministic_per_seed() -> None:
    a, b, c = split_digits(seed=3), split_digits(seed=3), split_digits(seed=4)
    assert torch.equal(a.tasks[2].train.x, b.tasks[2].train.x)
    assert not torch.equal(a.tasks[2].test.x, c.tasks[2].test.x)


PARTS = ("train", "val", "test")


def _recover(x: np.ndarray, data: np.ndarray, by_sorted: dict[bytes, int]):
    """Original image indices of permuted rows (sorted pixel values identify an image in
    load_digits) and the single column permutation P with x == data[idx][:, P]."""
    idx = np.array([by_sorted[np.sort(r).tobytes()] for r in x])
    orig = data[idx]
    cols = {orig[:, c].tobytes(): c for c in range(orig.shape[1])}
    perm = np.array([cols[x[:, c].tobytes()] for c in range(x.shape[1])])
    return idx, perm


def test_permuted_digits_fixed_permutations_and_shared_split() -> None:
    d = load_digits()
    data = (d.data / 16.0).astype(np.float32)
    by_sorted = {np.sort(r).tobytes(): i for i, r in enumerate(data)}
    bench, again, other = permuted_digits(seed=0), permuted_digits(seed=0), permuted_digits(seed=1)
    assert bench.num_tasks == 10 and bench.default_scenario == "domain"
    split_idx = None
    perms = []
    for task, task_again, task_other in zip(bench.tasks, again.tasks, other.tasks):
        assert task.num_classes == 10
        assert torch.equal(task.train.x, task_again.train.x), "permutation fixed per seed"
        assert not torch.equal(task.train.x, task_other.train.x)
        xs = {p: getattr(task, p).x.reshape(len(getattr(task, p)), -1).numpy() for p in PARTS}
        # one permutation per task, recovered from all its images, explains train, val and test
        idx, perm = _recover(np.concatenate(list(xs.values())), data, by_sorted)
        bounds = np.cumsum([0] + [len(x) for x in xs.values()])
        idx = {p: idx[bounds[i] : bounds[i + 1]] for i, p in enumerate(PARTS)}
        for part in PARTS:
            np.testing.assert_array_equal(xs[part], data[idx[part]][:, perm])
            assert torch.equal(getattr(task, part).y, torch.as_tensor(d.target[idx[part]]))
        perms.append(data[:, perm])
        assert not set(idx["test"]) & (set(idx["train"]) | set(idx["val"])), "test leakage"
        assert not set(idx["train"]) & set(idx["val"])
        if split_idx is None:
            split_idx = idx
        assert all(set(idx[p]) == set(split_idx[p]) for p in idx), "split shared by all tasks"
    distinct = {p.tobytes() for p in perms}
    assert len(distinct) == 10


def test_split_mnist1d_uses_its_own_test_split() -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    ref = make_dataset(get_dataset_args())
    np.random.set_state(state)
    bench = split_mnist1d(seed=0)
    assert bench.num_tasks == 5 and bench.input_shape == (1, 40)
    test_rows = {r.astype(np.float32).tobytes() for r in ref["x_test"]}
    for k, task in enumerate(bench.tasks):
        keep = np.isin(ref["y_test"], [2 * k, 2 * k + 1])
        assert len(task.test) == keep.sum()
        assert {r.tobytes() for r in task.test.x.reshape(len(task.test), -1).numpy()} <= test_rows
        train_rows = {r.tobytes() for r in task.train.x.reshape(len(task.train), -1).numpy()}
        val_rows = {r.tobytes() for r in task.val.x.reshape(len(task.val), -1).numpy()}
        assert not train_rows & test_rows and not val_rows & test_rows and not train_rows & val_rows
        assert len(task.train) + len(task.val) == np.isin(ref["y"], [2 * k, 2 * k + 1]).sum()


def test_builder_leaves_numpy_global_rng_alone() -> None:
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    split_mnist1d(seed=0)
    assert np.random.rand() == expected


def test_unknown_benchmark_lists_choices() -> None:
    with pytest.raises(ConfigError, match="split-digits"):
        get_benchmark("split-cifar")


def test_rotated_digits_task_zero_is_the_plain_digits_and_angles_grow() -> None:
    d = load_digits()
    data = (d.data / 16.0).astype(np.float32)
    bench = get_benchmark("rotated-digits", seed=0, num_tasks=4)
    assert bench.num_tasks == 4 and bench.default_scenario == "domain"
    assert [t.name for t in bench.tasks] == ["rotation 0", "rotation 45", "rotation 90", "rotation 135"]
    rows = {r.tobytes(): i for i, r in enumerate(data)}
    plain = bench.tasks[0]
    idx = {p: np.array([rows[r.tobytes()] for r in getattr(plain, p).x.reshape(-1, 64).numpy()]) for p in PARTS}
    assert not set(idx["test"]) & (set(idx["train"]) | set(idx["val"])), "test leakage"
    # 90 degrees with bilinear interpolation on the 8x8 grid is an exact rotation of the pixels
    quarter = bench.tasks[2].test.x.reshape(-1, 8, 8).numpy()
    expected = np.rot90(data[idx["test"]].reshape(-1, 8, 8), k=1, axes=(1, 2))
    np.testing.assert_allclose(quarter, expected, atol=1e-6)
    assert all(torch.equal(t.test.y, plain.test.y) for t in bench.tasks)


def test_permuted_mnist1d_permutes_the_40_samples_per_task() -> None:
    bench = get_benchmark("permuted-mnist1d", seed=0, num_tasks=3)
    assert bench.num_tasks == 3 and bench.input_shape == (1, 40)
    first = bench.tasks[0].test.x.reshape(-1, 40).numpy()
    for task in bench.tasks[1:]:
        other = task.test.x.reshape(-1, 40).numpy()
        np.testing.assert_array_equal(np.sort(other, axis=1), np.sort(first, axis=1))
        assert not np.array_equal(other, first)
        assert torch.equal(task.test.y, bench.tasks[0].test.y)


def test_num_tasks_only_for_sequences() -> None:
    assert get_benchmark("permuted-digits", seed=0, num_tasks=3).num_tasks == 3
    with pytest.raises(ConfigError, match="fixed number of tasks"):
        get_benchmark("split-digits", seed=0, num_tasks=3)
