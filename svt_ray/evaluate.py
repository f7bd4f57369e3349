"""Frozen-feature evaluation: DINO's weighted kNN, a linear probe, and slow-fast features.

References: DINO `eval_knn.py` (weighted vote with exp(sim / T), k=20, T=0.07), SVT
`eval_linear.py` (linear layer on the frozen teacher CLS), and the paper's slow-fast
inference (svt_spec §5): one slow clip (8 x 224) and one fast clip (64 x 96) per video, CLS
averaged. Everything here is plain torch on in-memory features; extracting the features
from shards with Ray Data lives in `svt_ray.data` and `svt_ray.train`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Accuracy:
    top1: float  # percent
    top5: float  # percent


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> Accuracy:
    """(n, c) class scores and (n,) labels -> top-1 and top-5 accuracy in percent."""
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    hits = top == labels[:, None]
    return Accuracy(
        top1=100.0 * hits[:, 0].float().mean().item(),
        top5=100.0 * hits.any(dim=1).float().mean().item(),
    )


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """DINO's weighted kNN: each of the k nearest (cosine) neighbours votes exp(sim / T)."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, test.shape[0], chunk):
        similarity = test[start : start + chunk] @ train.t()
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(top_index.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[top_index], (top_similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(
    train_features, train_labels, test_features, test_labels, num_classes, k=20, temperature=0.07
) -> Accuracy:
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    return topk_accuracy(scores, test_labels)


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> Accuracy:
    """A linear layer on frozen, standardised features (SGD, momentum 0.9, cosine lr).

    Features are standardised with the training statistics, which makes one lr work for
    backbones of any scale; the layer is initialised N(0, 0.01) as in SVT's eval_linear.py.
    """
    generator = torch.Generator().manual_seed(seed)
    mean = train_features.float().mean(0, keepdim=True)
    std = train_features.float().std(0, keepdim=True).clamp_min(1e-6)
    train = (train_features.float() - mean) / std
    test = (test_features.float() - mean) / std
    layer = nn.Linear(train.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.01, generator=generator)
        layer.bias.zero_()
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-train.shape[0] // batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(train.shape[0], generator=generator)
        for start in range(0, train.shape[0], batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(layer(train[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        return topk_accuracy(layer(test), test_labels)


@dataclass(frozen=True)
class EvalResult:
    """Accuracies of one feature set (single clip or slow-fast)."""

    name: str
    knn: Accuracy
    linear: Accuracy

    def row(self) -> dict[str, float | str]:
        return {
            "features": self.name,
            "knn_top1": self.knn.top1,
            "knn_top5": self.knn.top5,
            "linear_top1": self.linear.top1,
            "linear_top5": self.linear.top5,
        }


def evaluate_features(
    name: str,
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    linear_epochs: int = 100,
) -> EvalResult:
    return EvalResult(
        name=name,
        knn=knn_accuracy(
            train_features, train_labels, test_features, test_labels, num_classes, k, temperature
        ),
        linear=linear_probe_accuracy(
            train_features, train_labels, test_features, test_labels, num_classes, linear_epochs
        ),
    )


def format_table(rows: list[dict[str, float | str]]) -> str:
    """A Markdown table of result rows (the same text goes to stdout and to MLflow)."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class FeatureExtractor:
    """Teacher-backbone CLS features of uint8 clips; slow-fast = mean of the two clips' CLS.

    Used as a Ray Data callable class (one model per actor) and directly in tests.
    """

    def __init__(self, backbone: nn.Module, mean, std, device: str = "cpu"):
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1, 1)

    @torch.no_grad()
    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 (b, 3, t, h, w) -> (b, d) CLS features."""
        x = clips.to(self.device, non_blocking=True).float().div_(255.0)
        return self.backbone.forward_features((x - self.mean) / self.std).float().cpu()

    def slow_fast(self, slow: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
        return (self.features(slow) + self.features(fast)) / 2
