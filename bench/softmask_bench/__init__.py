"""softmask_bench: the benchmark harness of softmask-peft (installed with the `bench` extra).

Continual-learning benchmarks (Split/Permuted-Digits, Split-MNIST1D), baselines (fine-tuning,
EWC, joint), reports, the DAS continual pre-training study on MiniLM, the device demo, and the
`softmask-peft` subcommands demo, bench and das-pretrain (`commands`). It uses the library only
through its public modules; the library never imports it.
"""
