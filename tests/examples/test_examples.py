"""Every integration example runs as a user would run it (subprocess, real packages, CPU).

Slow (each starts Python, transformers and maybe torchrun): `pytest -m slow tests/examples`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run(*argv: str, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_trainer_example(tmp_path):
    out = run("examples/train_trainer.py", "--out", str(tmp_path))
    assert "accuracy on task 1" in out
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    ckpts = sorted((tmp_path / "task1").glob("checkpoint-*"))
    assert ckpts and all((c / "softmask_importance.safetensors").is_file() for c in ckpts)


def test_peft_lora_example(tmp_path):
    out = run("examples/train_peft_lora.py", "--out", str(tmp_path))
    assert "reloaded: 2 tasks, 8 masked LoRA tensors" in out
    names = {p.name for p in (tmp_path / "final").iterdir()}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names


def test_lightning_example(tmp_path):
    out = run("examples/train_lightning.py", "--out", str(tmp_path))
    assert "with 2 tasks" in out and (tmp_path / "softmask_importance.safetensors").is_file()


def test_accelerate_example_two_processes_equal_one(tmp_path):
    run("examples/train_accelerate.py", "--out", str(tmp_path / "one"))
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = run(*torchrun, "examples/train_accelerate.py", "--out", str(tmp_path / "two"))
    assert "processes=2" in out
    accelerate = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
                  "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    launched = subprocess.run(
        [*accelerate, "examples/train_accelerate.py", "--out", str(tmp_path / "launch")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "processes=2" in launched.stdout, launched.stderr[-3000:]
    for d in ("two", "launch"):
        one, two = (load_file(tmp_path / x / "model.safetensors") for x in ("one", d))
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    one, two = (load_file(tmp_path / d / "softmask_importance.safetensors") for d in ("one", "two"))
    # an attention key bias has an exactly-zero gradient (softmax ignores a per-row shift), so
    # its SPG importance is standardised float rounding noise: it differs between any two runs
    noise = [k for k in one if k.endswith("attention.self.key.bias")]
    assert noise
    for k in sorted(set(one) - set(noise)):
        torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=1e-3)


def test_trainer_example_under_two_processes(tmp_path):
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = run(*torchrun, "examples/train_trainer.py", "--out", str(tmp_path))
    assert out.count("saved ") == 2  # both ranks finished the sequence
    from transformers import AutoModelForSequenceClassification

    from softmask_peft import SoftMaskModel

    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    assert SoftMaskModel.from_pretrained(base, tmp_path / "final").num_tasks == 2


def test_plain_pytorch_quickstart_example(tmp_path):
    out = run("examples/quickstart_spg.py")
    rows = [line for line in out.splitlines() if line.startswith("after task 3")]
    accs = [float(v) for v in rows[0].split("|")[1].split()[2::3]]
    assert min(accs) > 0.85, out  # every earlier task still solved after the last one


def test_das_causal_lm_example():
    out = run("examples/train_das_causal_lm.py")
    assert "after high:" in out and "layer-0 head importance" in out


def test_device_example():
    out = run("examples/device_learner.py")
    assert "server now knows: ['task_0', 'learned_on_device']" in out


def test_sft_lora_example(tmp_path):
    out = run("examples/train_sft_lora.py", "--out", str(tmp_path), "--epochs", "1")
    assert "task 1 (upper) done: 2 task(s) learned" in out
    from peft import PeftModel
    from softmask_bench.char_lm import char_tokenizer, tiny_causal_lm
    from transformers import AutoModelForCausalLM

    from softmask_peft import SoftMaskModel
    from softmask_peft.integrations.callback import latest_complete_checkpoint

    AutoModelForCausalLM.from_pretrained(tmp_path / "serve")
    base = tiny_causal_lm(len(char_tokenizer()))  # the pretrained base: folded layers go onto it
    peft = PeftModel.from_pretrained(base, tmp_path / "continual", is_trainable=True)
    again = SoftMaskModel.from_pretrained(peft, tmp_path / "continual")
    assert again.num_tasks == 2 and len(again.lora_subspace.covariance) == 4
    assert latest_complete_checkpoint(tmp_path / "upper") is not None
