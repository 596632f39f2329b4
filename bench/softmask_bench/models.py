"""Small backbones for the benchmarks, with dropout (SPG's importance pass runs in train mode).

Task-incremental runs put a backbone in a `MultiHeadClassifier` (one head per task);
domain-incremental runs use `SharedHeadClassifier` (one head for every task).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from softmask_peft.errors import ConfigError
from softmask_peft.heads import MultiHeadClassifier

ARCHS = ("mlp", "cnn")


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] x len(hidden); output dim = hidden[-1]."""

    def __init__(
        self, in_features: int, hidden: tuple[int, ...] = (256, 256), dropout: float = 0.2
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Two conv blocks (1D or 2D by the input's rank) -> Linear; output dim = `hidden`.

    input_shape is (channels, length) for 1D signals or (channels, height, width) for images.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        channels: tuple[int, int] = (16, 32),
        hidden: int = 128,
        dropout: float = 0.2,
    ):
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise ConfigError(f"CNN input_shape must be (C, L) or (C, H, W), got {input_shape}")
        conv, pool = (
            (nn.Conv1d, nn.MaxPool1d) if len(input_shape) == 2 else (nn.Conv2d, nn.MaxPool2d)
        )
        c1, c2 = channels
        self.features = nn.Sequential(
            conv(input_shape[0], c1, 3, padding=1),
            nn.ReLU(),
            pool(2),
            conv(c1, c2, 3, padding=1),
            nn.ReLU(),
            pool(2),
            nn.Flatten(),
        )
        flat = c2 * math.prod(s // 4 for s in input_shape[1:])
        self.fc = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(dropout)
        )
        self.out_features = hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class SharedHeadClassifier(nn.Module):
    """Backbone + one linear `head` shared by all tasks; `task_id` is accepted and ignored,
    so evaluation code is the same in both scenarios."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor, task_id: int | None = None) -> Tensor:
        return self.head(self.backbone(x))


def build_backbone(
    arch: str, input_shape: tuple[int, ...], mlp_hidden: tuple[int, ...] = (256, 256)
) -> nn.Module:
    """`arch` in ARCHS; the module exposes `out_features`. `mlp_hidden`: the MLP's widths."""
    if arch == "mlp":
        return MLP(math.prod(input_shape), hidden=tuple(mlp_hidden))
    if arch == "cnn":
        return CNN(input_shape)
    raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def build_classifier(
    arch: str,
    input_shape: tuple[int, ...],
    scenario: str,
    num_classes: int,
    mlp_hidden: tuple[int, ...] = (256, 256),
) -> nn.Module:
    """A `MultiHeadClassifier` (scenario "task", heads added per task) or a
    `SharedHeadClassifier` with `num_classes` outputs (scenario "domain")."""
    backbone = build_backbone(arch, input_shape, mlp_hidden)
    if scenario == "task":
        return MultiHeadClassifier(backbone, backbone.out_features)
    if scenario == "domain":
        return SharedHeadClassifier(backbone, backbone.out_features, num_classes)
    raise ConfigError(f"unknown scenario {scenario!r}; choose 'task' or 'domain'")


def head_module_names(scenario: str) -> list[str]:
    """Names of the classifier head modules (SoftMaskConfig.head_modules) per scenario."""
    return ["heads"] if scenario == "task" else ["head"]
