"""On-device training step: masked ORT step vs unmasked ORT step vs PyTorch eager, and checkpoint size.

For each model (digits-sized MLP and CNN with a shared 10-class head, two small BERT classifiers):
* `ort_masked`: one step of `EdgeLearner`'s session on the exported artifacts (gradient reset,
  forward + backward with the soft-mask before each gradient accumulator, plain SGD step),
  importance random in [0, 1]; the learner folds s, A and ā into its graph, so a step runs
  one Mul per masked tensor;
* `ort_as_written`: the same artifacts' training graph run as written (s, A and ā fed every
  step, keep = 1 − s·A computed every step, gradient outputs fetched): the step before the
  learners folded it;
* `ort_plain`: the same forward graph (`export_for_device`'s trace, same dynamic axes) and
  loss through ORT's generate_artifacts without our surgery (no importance, no masking);
* `torch_masked` / `torch_plain`: eager zero_grad + forward + backward + SoftMaskOptimizer(SGD)
  step (grad mode) / plain SGD step, same batch, same thread count.
Medians over repeats, the compared steps run alternately; target: ort_masked <= 1.05x ort_plain.
Checkpoint sizes are the artifacts' checkpoint file with importance stored as float32,
float16 and uint8; the step is timed with each storage. `session_ms`: building the learner's
session (graph rewrite + module), `session_as_written_ms`: a module on the graph as written.
Run: python bench/edge_step.py --out results/bench_edge_step.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from _common import paired_medians, print_table, write_json
from onnxruntime.training import artifacts as ort_artifacts
from softmask_bench.models import CNN, MLP, SharedHeadClassifier
from softmask_edge import EdgeLearner, Manifest, _ort
from softmask_edge.builder import _quiet_stderr
from softmask_edge.graphs import add_classification_loss, add_gradient_outputs
from torch import nn

from softmask_peft import SoftMaskConfig, SoftMaskOptimizer, get_softmask_model
from softmask_peft.device import _forward_graph, export_for_device
from softmask_peft.testing import seed_importance, tiny_bert_config

THREADS = 2  # default of --threads


def _models() -> dict[str, tuple[nn.Module, list[str], torch.Tensor, torch.Tensor]]:
    """name -> (model, head modules, example batch x, labels y)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    torch.manual_seed(0)
    mlp = MLP(64, dropout=0.0)
    out["mlp 64-256-256-10"] = (
        SharedHeadClassifier(mlp, mlp.out_features, 10),
        ["head"],
        torch.randn(32, 1, 8, 8, generator=g),
        torch.randint(0, 10, (32,), generator=g),
    )
    cnn = CNN((1, 8, 8), dropout=0.0)
    out["cnn 16-32-128-10"] = (
        SharedHeadClassifier(cnn, cnn.out_features, 10),
        ["head"],
        torch.randn(32, 1, 8, 8, generator=g),
        torch.randint(0, 10, (32,), generator=g),
    )
    from transformers import BertForSequenceClassification

    cfg = tiny_bert_config(
        num_labels=4, vocab_size=1000, hidden_size=64, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64,
    )  # fmt: skip
    out["tiny bert h64 l2 seq32"] = (
        BertForSequenceClassification(cfg),
        ["classifier"],
        {"input_ids": torch.randint(0, 1000, (8, 32), generator=g)},
        torch.randint(0, 4, (8,), generator=g),
    )
    medium = tiny_bert_config(
        num_labels=4, vocab_size=8000, hidden_size=256, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=1024, max_position_embeddings=128,
    )  # fmt: skip
    out["bert h256 l4 seq64 b16"] = (
        BertForSequenceClassification(medium),
        ["classifier"],
        {"input_ids": torch.randint(0, 8000, (16, 64), generator=g)},
        torch.randint(0, 4, (16,), generator=g),
    )
    return out


def _feeds(x, y) -> dict[str, np.ndarray]:
    values = {k: v.numpy() for k, v in (x.items() if isinstance(x, dict) else {"input": x}.items())}
    values.update(labels=y.numpy(), softmask_cross_head=np.array(0.0, np.float32))
    values["softmask_scale"] = np.array(1.0, np.float32)  # fed only to the graph as written
    return values


def _ort_step(session: _ort.TrainingSession, feeds: dict[str, np.ndarray]) -> None:
    session.reset_gradients()
    session.run(feeds, training=True)
    session.optimizer_step()


def _options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _as_written(directory: Path, threads: int) -> _ort.TrainingSession:
    """The artifacts' training graph as written: s, A and ā are fed, gradients fetched."""
    session = _ort.TrainingSession(
        directory / "training_model.onnx",
        directory / "eval_model.onnx",
        directory / "optimizer_model.onnx",
        _ort.load_checkpoint(directory / Manifest.load(directory).checkpoint),
        _options(threads),
        lr_in_graph=True,
        gradient_outputs=True,
    )
    session.new_optimizer(0.01)
    return session


def _plain_artifacts(model, x, directory: Path, threads: int) -> _ort.TrainingSession:
    """export_for_device's forward graph + loss, through generate_artifacts without masking."""
    forward, net, _ = _forward_graph(model, x, (), 17)
    add_gradient_outputs(forward)
    add_classification_loss(forward)
    directory.mkdir(parents=True)
    with _quiet_stderr():
        ort_artifacts.generate_artifacts(
            forward,
            requires_grad=[n for n, p in net.named_parameters() if p.requires_grad],
            loss=None,
            optimizer=ort_artifacts.OptimType.SGD,
            artifact_directory=directory,
        )
    session = _ort.TrainingSession(
        directory / "training_model.onnx",
        directory / "eval_model.onnx",
        directory / "optimizer_model.onnx",
        _ort.load_checkpoint(directory / "checkpoint"),
        _options(threads),
        lr_in_graph=False,
    )
    session.new_optimizer(0.01)
    return session


def _torch_step(model, optimizer, x, y) -> None:
    optimizer.zero_grad()
    out = model(**x) if isinstance(x, dict) else model(x)
    logits = out.logits if hasattr(out, "logits") else out
    F.cross_entropy(logits, y).backward()
    optimizer.step()


def bench_model(
    name: str, net: nn.Module, heads: list[str], x, y, repeats: int, root: Path, threads: int
) -> dict[str, object]:
    torch.set_num_threads(threads)
    net.train()
    model = get_softmask_model(net, SoftMaskConfig(head_modules=heads))
    params = dict(net.named_parameters())
    model.begin_task(0)
    seed_importance(model, {n: torch.rand_like(params[n]) for n in model.masked_parameter_names})
    feeds = _feeds(x, y)
    plain = _plain_artifacts(model, x, root / "plain", threads)
    sizes, ratios = {}, {}
    for dtype in ("float32", "float16", "uint8"):
        export_for_device(model, x, root / dtype, importance_dtype=dtype)
        learner = EdgeLearner(root / dtype, threads=threads)
        sizes[dtype] = (root / dtype / learner.manifest.checkpoint).stat().st_size
        session = learner._runtime._session
        session.new_optimizer(0.01)
        written = _as_written(root / dtype, threads)
        t_masked, t_written, t_plain = paired_medians(
            [
                lambda s=session: _ort_step(s, feeds),
                lambda s=written: _ort_step(s, feeds),
                lambda: _ort_step(plain, feeds),
            ],
            repeats,
        )
        ratios[dtype] = (t_masked / t_plain, t_written / t_plain)
        if dtype == "float32":
            times = t_masked, t_written, t_plain
            constants = learner._runtime._constants(session.state, 1.0)
            session_s = paired_medians(
                [
                    lambda s=session, c=constants: s.specialize(c, gradient_outputs=False),
                    lambda s=written: s.specialize({}, gradient_outputs=True),
                ],
                3,
                warmup=1,
            )

    model.begin_task(1)
    trainable = [p for p in net.parameters() if p.requires_grad]
    masked_opt = SoftMaskOptimizer(torch.optim.SGD(trainable, lr=0.01), model)
    plain_opt = torch.optim.SGD(trainable, lr=0.01)
    t_torch_masked, t_torch_plain = paired_medians(
        [lambda: _torch_step(model, masked_opt, x, y), lambda: _torch_step(net, plain_opt, x, y)],
        repeats,
    )
    return {
        "model": name,
        "params": sum(p.numel() for p in trainable),
        "ort_masked_ms": 1e3 * times[0],
        "ort_plain_ms": 1e3 * times[2],
        "masked/plain": ratios["float32"][0],
        "as_written/plain": ratios["float32"][1],
        "f16 masked/plain": ratios["float16"][0],
        "u8 masked/plain": ratios["uint8"][0],
        "u8 as_written/plain": ratios["uint8"][1],
        "torch_masked_ms": 1e3 * t_torch_masked,
        "torch_plain_ms": 1e3 * t_torch_plain,
        "ort/torch (masked)": times[0] / t_torch_masked,
        "session_ms": 1e3 * session_s[0],
        "session_as_written_ms": 1e3 * session_s[1],
        "ckpt_f32_kb": sizes["float32"] / 1024,
        "ckpt_f16_kb": sizes["float16"] / 1024,
        "ckpt_u8_kb": sizes["uint8"] / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument(
        "--threads", type=int, default=THREADS, help="torch and ORT intra-op threads"
    )
    parser.add_argument("--out", default="results/bench_edge_step.json")
    parser.add_argument(
        "--models", nargs="+", default=None, help="only models whose name contains one of these"
    )
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (net, heads, x, y)) in enumerate(_models().items()):
            if args.models and not any(m in name for m in args.models):
                continue
            root = Path(tmp) / str(i)
            rows.append(bench_model(name, net, heads, x, y, args.repeats, root, args.threads))
    print_table(rows, list(rows[0]))
    write_json(args.out, "edge_step", rows)


if __name__ == "__main__":
    main()
