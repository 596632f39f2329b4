"""SoftMaskCallback with the real Lightning Trainer on CPU (tiny MLP), against a plain loop."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import classification_batches, small_mlp
from torch.utils.data import DataLoader, TensorDataset

from softmask_peft import SoftMaskConfig, SoftMaskOptimizer, get_softmask_model
from softmask_peft.integrations.lightning import SoftMaskCallback

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Module(pl.LightningModule):
    def __init__(self, model, make_opt):
        super().__init__()
        self.model, self.make_opt = model, make_opt

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return self.make_opt(self.model.parameters())


def tasks() -> list[DataLoader]:
    loaders = []
    for s in (7, 8):
        ((x, y),) = classification_batches(n=16, in_features=6, batch_size=16, seed=s)
        loaders.append(DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False))
    return loaders


OPTIMIZERS = {
    "grad": (lambda ps: torch.optim.SGD(ps, lr=0.3), 2),  # with gradient accumulation
    "update": (lambda ps: torch.optim.AdamW(ps, lr=0.05), 1),
}


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_two_fits_equal_a_plain_masked_loop(mode):
    make_opt, accumulate = OPTIMIZERS[mode]
    model = get_softmask_model(small_mlp(p=0.0), SoftMaskConfig(mask_mode=mode))
    callback = SoftMaskCallback(model)
    for data in tasks():
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=2,
            callbacks=[callback],
            accumulate_grad_batches=accumulate,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Module(model, make_opt), data)
    assert model.num_tasks == 2 and model.current_task is None

    ref = get_softmask_model(small_mlp(p=0.0), SoftMaskConfig(mask_mode=mode))
    for t, data in enumerate(tasks()):
        ref.begin_task(t)
        opt = SoftMaskOptimizer(make_opt(ref.parameters()), ref)
        for _ in range(2):
            for i, (x, y) in enumerate(data):
                (F.cross_entropy(ref(x), y) / accumulate).backward()
                if (i + 1) % accumulate == 0:
                    opt.step()
                    opt.zero_grad()
        ref.end_task(data)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    for k, v in ref.importance.items():
        torch.testing.assert_close(model.importance[k], v, rtol=1e-5, atol=1e-6)
    assert any(float(v.max()) > 0.5 for v in ref.importance.values())


# issue 19, class 8 (the Lightning parts) -------------------------------------------------


def quiet_trainer(callback, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        callbacks=[callback], max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **kwargs,
    )


def sgd(ps):
    return torch.optim.SGD(ps, lr=0.1)


@pytest.mark.parametrize("how", ["limit_train_batches=0", "empty loader"])
def test_a_fit_without_training_batches_is_a_library_error_and_the_task_stays_open(how):
    from softmask_peft import EmptyDataError

    model = get_softmask_model(small_mlp(in_features=6), SoftMaskConfig())
    callback = SoftMaskCallback(model)
    (loader, _) = tasks()
    kwargs = {"limit_train_batches": 0} if how.startswith("limit") else {}
    if how == "empty loader":
        x, y = loader.dataset.tensors
        loader = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4)
    with pytest.raises(EmptyDataError, match="no training batch|no batches"):
        quiet_trainer(callback, **kwargs).fit(Module(model, sgd), loader)
    assert model.current_task == 0 and model.num_tasks == 0


def test_the_fit_end_hook_outside_a_fit_is_a_library_error():
    from softmask_peft import EmptyDataError

    model = get_softmask_model(small_mlp(in_features=6), SoftMaskConfig())
    callback = SoftMaskCallback(model)
    module = Module(model, sgd)
    with pytest.raises(EmptyDataError, match="outside Trainer.fit"):
        callback.on_fit_end(quiet_trainer(callback), module)


def test_a_callback_bound_to_another_model_is_refused_before_training():
    from softmask_peft import ConfigError

    trained = get_softmask_model(small_mlp(in_features=6), SoftMaskConfig())
    other = get_softmask_model(small_mlp(in_features=6), SoftMaskConfig())
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    with pytest.raises(ConfigError, match="does not train the SoftMaskModel"):
        quiet_trainer(SoftMaskCallback(other)).fit(Module(trained, sgd), tasks()[0])
    assert all(torch.equal(v, before[k]) for k, v in trained.state_dict().items())
    assert other.current_task is None  # nothing begun on the wrong model
