"""Compare SPG with fine-tuning and EWC on Split-Digits from Python (what `softmask-peft bench`
does), then print the metric table and write markdown, JSON and a heatmap into ./results.

    python examples/continual_benchmark.py
"""

import torch
from softmask_bench.report import markdown_report, write_report
from softmask_bench.runner import run_benchmark
from softmask_bench.training import TrainConfig

torch.set_num_threads(1)  # tiny models: one thread is fastest
cfg = TrainConfig(epochs=30)  # per task: SGD lr 0.25, early stopping on validation loss
results = run_benchmark("split-digits", ["spg", "finetune", "ewc"], seeds=[0, 1], cfg=cfg)
print(markdown_report(results, cfg.to_dict()))
print(write_report(results, "results", cfg.to_dict()))

spg = next(r for r in results if r.method == "spg")
print("SPG's trained SoftMaskModel:", type(spg.model).__name__, "tasks:", spg.model.num_tasks)
