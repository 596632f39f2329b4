"""Byte-level fuzzing of every file `from_pretrained` reads: the library's own error or a load.

Random byte flips, insertions and truncations of the config, the importance file and the
weights must end in a `SoftMaskError` (or a load that passes every check), never another
exception type or a hang, and never a large allocation (a file may only make us allocate what
its own bytes justify).
"""

from __future__ import annotations

import resource
import shutil

import pytest
import torch
from helpers import byte_edits, multi_head, mutate_bytes, run_tasks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from softmask_format.names import CONFIG_NAME, IMPORTANCE_NAME, WEIGHTS_NAME

from softmask_peft import SoftMaskConfig, SoftMaskError, SoftMaskModel, get_softmask_model

FILES = (CONFIG_NAME, IMPORTANCE_NAME, WEIGHTS_NAME)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz") / "ckpt"
    net = multi_head(in_features=6, backbone="mlp")
    model = get_softmask_model(net, SoftMaskConfig(importance_dtype="uint8"))
    run_tasks(model, 2, classes=[3, 2]).save_pretrained(directory)
    return directory


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(FILES), changes=byte_edits, cut=st.none() | st.floats(0, 1))
def test_a_mutated_checkpoint_loads_or_raises_our_error(checkpoint, tmp_path, name, changes, cut):
    target = tmp_path / "mutated"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(checkpoint, target)
    (target / name).write_bytes(mutate_bytes((checkpoint / name).read_bytes(), changes, cut))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        loaded = SoftMaskModel.from_pretrained(multi_head(in_features=6, backbone="mlp"), target)
    except SoftMaskError:
        pass
    else:
        assert loaded.num_tasks <= 2
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    assert grown_kib < 16 * 1024, f"loading a {name} mutation raised peak memory by {grown_kib} KiB"


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    """A LoRA PeftModel after one task with the subspace mask: lora_subspace.safetensors too."""
    directory = tmp_path_factory.mktemp("fuzz") / "lora"
    model = get_softmask_model(lora_linear(), SoftMaskConfig())
    model.begin_task(0)
    model.end_task([{"input_ids": torch.randn(6, 4)}])
    model.save_pretrained(directory)
    return directory


def lora_linear():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("lin", torch.nn.Linear(4, 3))
    net.forward = lambda input_ids, **kw: net.lin(input_ids)
    return get_peft_model(net, LoraConfig(r=2, target_modules=["lin"]))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=byte_edits, cut=st.none() | st.floats(0, 1))
def test_a_mutated_lora_subspace_file_loads_or_raises_our_error(lora_checkpoint, tmp_path, changes, cut):
    target = tmp_path / "mutated"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(lora_checkpoint, target)
    name = "lora_subspace.safetensors"
    (target / name).write_bytes(mutate_bytes((lora_checkpoint / name).read_bytes(), changes, cut))
    fresh = lora_linear()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        loaded = SoftMaskModel.from_pretrained(fresh, target)
    except SoftMaskError:
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    else:
        assert loaded.num_tasks == 1
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    assert grown_kib < 16 * 1024, f"a lora_subspace mutation raised peak memory by {grown_kib} KiB"
