"""Reliability round 3 (issue 19): odd parameters, hostile headers, edited configs, adapter
names, batches the importance pass and the masked step must refuse or accept cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    classification_batches,
    run_tasks,
    saved_mlp,
    small_mlp,
    snapshot,
    text_batches,
    tiny_bert,
)
from packaging.requirements import Requirement
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from torch import nn

from softmask_peft import (
    BatchError,
    ConfigError,
    ImportanceMismatchError,
    SoftMaskConfig,
    SoftMaskModel,
    SoftMaskOptimizer,
    WeightsMismatchError,
    get_softmask_model,
)
from softmask_peft.errors import NonFiniteGradientError
from softmask_peft.store import ImportanceStore

ROOT = Path(__file__).resolve().parents[1]

# class 2: parameters of every shape and layout round-trip --------------------------------------


class OddParameters(nn.Module):
    """A 0-d learnable temperature (CLIP's logit_scale), a tied pair and a transposed weight."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.enc = nn.Linear(6, 6)
        self.dec = nn.Linear(6, 6)
        self.dec.weight = self.enc.weight  # tied
        self.proj = nn.Parameter(torch.randn(3, 6).t())  # non-contiguous (a view of a transpose)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (torch.tanh(self.dec(torch.tanh(self.enc(x)))) @ self.proj)


def odd_model(dtype: torch.dtype = torch.float32) -> OddParameters:
    torch.manual_seed(0)
    return OddParameters().to(dtype)


@pytest.mark.parametrize("storage", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_zero_dim_tied_half_and_non_contiguous_parameters_round_trip(tmp_path, storage, dtype):
    model = get_softmask_model(odd_model(dtype), SoftMaskConfig(importance_dtype=storage))
    assert not model.base_model.proj.is_contiguous()
    batches = [(x.to(dtype), y) for x, y in classification_batches(n=8, in_features=6, seed=3)]
    model.begin_task(0)
    model.end_task(batches)
    assert model.importance["scale"].shape == ()  # importance of a 0-d parameter is 0-d
    model.save_pretrained(tmp_path)
    loaded = SoftMaskModel.from_pretrained(odd_model(dtype), tmp_path)
    for name, p in model.base_model.state_dict().items():
        q = loaded.base_model.state_dict()[name]
        assert q.shape == p.shape and q.dtype == p.dtype and torch.equal(q, p), name
    assert loaded.base_model.dec.weight is loaded.base_model.enc.weight  # still tied
    assert loaded.importance.keys() == model.importance.keys()
    for name, a in model.importance.items():
        b = loaded.importance[name]
        assert b.shape == a.shape, name
        tol = {"float32": 0.0, "float16": 1e-3, "uint8": 0.03}[storage]
        assert float((a - b).abs().max()) <= tol, name


# class 3: a header declaring huge tensors costs nothing -------------------------------------


SPARSE_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from helpers import small_mlp
    from softmask_peft import SoftMaskModel, SoftMaskError
    from safetensors import safe_open
    for target in map(Path, {targets!r}):
        with safe_open(target, framework="pt") as f:
            save_id = f.metadata()["save_id"]  # the pairing holds: only the size is hostile
        header = json.dumps({{
            "__metadata__": {{"format": "pt", "format_version": "3", "num_tasks": "0",
                              "tasks": "[]", "dtype": "float32", "save_id": save_id}},
            "fc1.weight": {{"dtype": "F32", "shape": [200000000], "data_offsets": [0, 800000000]}},
        }}).encode()
        with open(target, "wb") as f:  # a sparse file: 800 MB apparent, a few KB on disk
            f.write(len(header).to_bytes(8, "little") + header)
            f.truncate(8 + len(header) + 800000000)
        net = small_mlp(in_features=6)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            SoftMaskModel.from_pretrained(net, target.parent)
            outcome = "loaded"
        except SoftMaskError as e:
            outcome = type(e).__name__
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({{"file": target.name, "outcome": outcome, "grown_mb": grown / 1024}}))
    """
)


def test_a_header_declaring_a_huge_tensor_is_refused_before_any_allocation(tmp_path):
    """One probe process (imports once) for the importance file and the weights, each in its own
    checkpoint: our error, and at most 100 MB more memory for a file claiming 800 MB."""
    expected = {
        "softmask_importance.safetensors": "ImportanceMismatchError",
        "model.safetensors": "WeightsMismatchError",
    }
    targets = [str(saved_mlp(tmp_path / name)[1] / name) for name in expected]
    script = SPARSE_PROBE.format(tests=str(ROOT / "tests"), targets=targets)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = [json.loads(line) for line in out.stdout.strip().splitlines()[-2:]]
    assert {r["file"]: r["outcome"] for r in results} == expected
    assert all(r["grown_mb"] < 100 for r in results), results  # the files claim 800 MB


def test_a_sparse_header_names_the_tensor(tmp_path):
    _, directory = saved_mlp(tmp_path)
    path = directory / "softmask_importance.safetensors"

    with safe_open(path, framework="pt") as f:
        save_id = f.metadata()["save_id"]
    header = json.dumps(
        {
            "__metadata__": {
                "format_version": "3", "num_tasks": "0", "tasks": "[]", "dtype": "float32",
                "save_id": save_id,
            },
            "fc1.weight": {"dtype": "F32", "shape": [1 << 26], "data_offsets": [0, 1 << 28]},
        }
    ).encode()
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + (1 << 28))
    with pytest.raises(ImportanceMismatchError, match=r"fc1.weight: shape \(67108864,\)"):
        SoftMaskModel.from_pretrained(small_mlp(in_features=6), directory)


# class 4: config edits that change the masked set -----------------------------------------


def edit_config(directory: Path, **changes) -> None:
    path = directory / "softmask_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "changes",
    [{"head_modules": ["fc2"]}, {"exclude_modules": ["fc1"]}, {"target_modules": ["fc2"]}],
    ids=["head", "exclude", "target"],
)
def test_a_config_edit_that_changes_the_masked_set_is_refused(tmp_path, changes):
    _, directory = saved_mlp(tmp_path)
    edit_config(directory, **changes)
    net = small_mlp(in_features=6)
    before = snapshot(net)
    with pytest.raises(ConfigError, match="edited after saving"):
        SoftMaskModel.from_pretrained(net, directory)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_a_config_edit_that_keeps_the_masked_set_loads(tmp_path):
    model, directory = saved_mlp(tmp_path)
    edit_config(directory, mask_mode="update", target_modules=["fc1", "fc2"])  # same parameters
    loaded = SoftMaskModel.from_pretrained(small_mlp(in_features=6), directory)
    assert loaded.softmask_config.mask_mode == "update"
    assert loaded.masked_parameter_names == model.masked_parameter_names


# class 5: adapter names are folder names inside the save -----------------------------------


@pytest.mark.parametrize("kind", ["absolute", "nested"])  # PEFT itself refuses names with "."
def test_an_adapter_name_outside_the_folder_is_refused(tmp_path, kind):
    outside = tmp_path / "outside"
    name = {"absolute": str(outside), "nested": "a/b"}[kind]
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])
    peft = get_peft_model(tiny_bert(), lora, adapter_name=name)
    model = get_softmask_model(peft, SoftMaskConfig(head_modules=["classifier"]))
    model.begin_task(0)
    model.end_task(text_batches(n=4, seed=1))
    with pytest.raises(ConfigError, match="not plain folder names"):
        model.save_pretrained(tmp_path / "ckpt")
    assert not outside.exists()
    assert not (tmp_path / "ckpt").exists()  # a refused save removes the folder it created


# class 7: batches ------------------------------------------------------------------------


def test_out_of_range_labels_in_dict_batches_are_a_batch_error():
    model = get_softmask_model(tiny_bert(num_labels=3), SoftMaskConfig(head_modules=["classifier"]))
    batches = text_batches(n=4, seed=1)
    batches[0]["labels"] = torch.tensor([0, 9, 1, 2])
    model.begin_task(0)
    with pytest.raises(BatchError, match="labels"):
        model.end_task(batches)
    with pytest.raises(BatchError, match="labels"):
        model.training_loss(batches[0])


def importance_of(batches) -> dict[str, torch.Tensor]:
    model = get_softmask_model(small_mlp(in_features=6), SoftMaskConfig())
    model.begin_task(0)
    return model.end_task(batches)


@pytest.mark.parametrize(
    "convert",
    [
        lambda x, y: (x.double(), y),
        lambda x, y: (x, y.int()),
        lambda x, y: (x, y.to(torch.int16)),
        lambda x, y: (x, y.to(torch.uint8)),
    ],
    ids=["float64-inputs", "int32-labels", "int16-labels", "uint8-labels"],
)
def test_other_input_and_label_dtypes_give_the_same_importance(convert):
    batches = classification_batches(n=12, in_features=6, seed=5)
    expected = importance_of(batches)
    got = importance_of([convert(x, y) for x, y in batches])
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)


def test_half_inputs_are_accepted_by_end_task():
    batches = classification_batches(n=12, in_features=6, seed=5)
    got = importance_of([(x.half(), y) for x, y in batches])
    assert all(bool(torch.isfinite(v).all()) for v in got.values())


def test_bool_labels_are_a_batch_error():
    batches = [(x, y > 0) for x, y in classification_batches(n=8, in_features=6, seed=5)]
    model = get_softmask_model(small_mlp(in_features=6), SoftMaskConfig())
    model.begin_task(0)
    with pytest.raises(BatchError, match="bool"):
        model.end_task(batches)


OPTIMIZERS = {
    "sgd-grad": (lambda ps: torch.optim.SGD(ps, lr=0.1), "grad"),
    "adam-update": (lambda ps: torch.optim.Adam(ps, lr=0.01), "update"),
    "adamw-grad": (lambda ps: torch.optim.AdamW(ps, lr=0.01), "grad"),
}


@pytest.mark.filterwarnings("ignore:mask_mode='grad'")
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_feature_never_reaches_a_parameter(kind, bad):
    make, mode = OPTIMIZERS[kind]
    model = run_tasks(get_softmask_model(small_mlp(in_features=6), SoftMaskConfig()), 1)
    model.begin_task(1)
    opt = SoftMaskOptimizer(make(model.parameters()), model, mode)
    (x, y), *_ = classification_batches(n=4, in_features=6, seed=9)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # a finite step works
    before = snapshot(model.base_model)
    x = x.clone()
    x[0, 0] = bad
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(NonFiniteGradientError, match="fc"):
        opt.step()
    after = model.base_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing written


# issue 22: the save id is the file's provenance, not the store's ----------------------------


def test_the_store_holds_no_file_provenance_and_the_loader_returns_it(tmp_path):
    from softmask_peft.persistence import read_importance

    model, directory = saved_mlp(tmp_path)
    assert not hasattr(ImportanceStore(), "save_id")
    shapes = {n: p.shape for n, p in model.base_model.named_parameters()}
    saved = read_importance(directory / "softmask_importance.safetensors", shapes, required=set())
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        weights_id = f.metadata()["save_id"]
    assert len(saved.save_id) == 32 and saved.save_id == weights_id
    assert not hasattr(saved.store, "save_id")
    model.save_pretrained(directory)  # a second save: a new id, the store unchanged
    again = read_importance(directory / "softmask_importance.safetensors", shapes, required=set())
    assert again.save_id != saved.save_id


def test_weights_from_another_architecture_are_still_named_first(tmp_path):
    _, directory = saved_mlp(tmp_path)
    with pytest.raises(WeightsMismatchError):
        SoftMaskModel.from_pretrained(small_mlp(in_features=6, hidden=9), directory)




# class 10: Python versions -----------------------------------------------------------------


def _extras() -> dict[str, list[Requirement]]:
    """pyproject.toml's optional dependencies, parsed."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pytest itself requires tomli on Python 3.10
        import tomli as tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {name: [Requirement(r) for r in reqs] for name, reqs in extra.items()}


def _selected(reqs: list[Requirement], version: str) -> list[Requirement]:
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"python_version": version})]


def test_the_onnx_extra_installs_the_runtime_on_python_3_12_and_nothing_on_3_13():
    reqs = _extras()["onnx"]
    assert {r.name for r in reqs} == {"onnxruntime-training-cpu", "onnx"}
    for version, installs in [("3.10", True), ("3.11", True), ("3.12", True), ("3.13", False)]:
        assert all(r.marker.evaluate({"python_version": version}) == installs for r in reqs), version


def test_every_extra_asks_for_each_package_once_on_every_python_and_3_10_gets_the_same_ones():
    """Python 3.10 takes older trl / docs releases through markers (the newer ones need 3.11):
    on each Python exactly one requirement per package is selected, and 3.10 installs the same
    packages as 3.12, plus only the pymdown-extensions cap that mkdocstrings 1.0.6 needs."""
    for name, reqs in _extras().items():
        for version in ("3.10", "3.11", "3.12", "3.13"):
            names = [r.name for r in _selected(reqs, version)]
            assert len(names) == len(set(names)), (name, version, names)
        old = {r.name for r in _selected(reqs, "3.10")}
        new = {r.name for r in _selected(reqs, "3.12")}
        assert old - new <= {"pymdown-extensions"} and new <= old, (name, old ^ new)
    trl = _selected(_extras()["trl"], "3.10")
    assert [r.specifier.contains("1.14.2") for r in trl if r.name == "trl"] == [True]


def test_softmask_edge_without_its_runtime_is_a_clear_library_error():
    script = (
        "import sys; sys.modules['onnxruntime'] = None\n"  # as on a Python with no wheel
        "import softmask_edge\n"  # the package itself imports (ExecuTorch needs no onnx)
        "try:\n    softmask_edge.build_artifacts\n"
        "except ImportError as e:\n    print(type(e).__name__, '|', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    kind, message = out.stdout.strip().split(" | ", 1)
    assert kind == "RuntimeUnavailableError", out.stdout + out.stderr
    assert "onnxruntime-training-cpu==1.19.2" in message
    if sys.version_info[:2] <= (3, 12):  # a wheel exists: the advice installs it
        assert "softmask-peft[onnx]" in message
    else:  # none exists: the advice says so and names the other runtime
        assert "no build for Python 3.1" in message and "runtime='executorch'" in message
