"""Distillation losses (KD and CRD), the dataset wrapper CRD needs, and the training objectives.

An *objective* is what :class:`ordercomp.train.Trainer` minimises: a callable
``objective(model, x, y, index) -> loss`` that runs the model itself, so it can also run a
teacher, hook penultimate features or treat the exits of an :class:`~ordercomp.nn.ExitNet`
separately. Objectives are ``nn.Module`` s: their own parameters (the CRD embeddings) are
trained alongside the model's.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .nn import ExitNet

__all__ = [
    "kd_loss",
    "distillation_loss",
    "CRDLoss",
    "IndexedDataset",
    "with_indices",
    "final_classifier",
    "PenultimateFeatures",
    "exit_outputs",
    "TaskObjective",
    "DistillObjective",
]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch."""
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T


def _check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= float(value) < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_distill_weights(alpha, beta, gamma, T) -> None:
    """Validates the loss weights (all >= 0, not all zero) and the temperature (> 0)."""
    weights = [_check_weight(n, v) for n, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma))]
    if not any(weights):
        raise ValueError("alpha, beta and gamma must not all be 0")
    if isinstance(T, bool) or not isinstance(T, Real) or not 0 < float(T) < math.inf:
        raise ValueError(f"T must be a finite number > 0, got {T!r}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.9,
    beta: float = 0.0,
    gamma: float = 0.1,
    T: float = 4.0,
    crd: Optional["CRDLoss"] = None,
    student_features: Optional[torch.Tensor] = None,
    teacher_features: Optional[torch.Tensor] = None,
    index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """gamma * CE(student, targets) + alpha * KD(student, teacher, T) + beta * CRD.

    The CRD term needs ``crd`` (a :class:`CRDLoss`), both penultimate features and the
    samples' dataset ``index``; with ``beta = 0`` it is skipped.
    """
    loss = student_logits.new_zeros(())
    if gamma:
        loss = loss + gamma * F.cross_entropy(student_logits, targets)
    if alpha:
        loss = loss + alpha * kd_loss(student_logits, teacher_logits, T)
    if beta:
        if crd is None or student_features is None or teacher_features is None or index is None:
            raise ValueError("beta > 0 needs crd, student_features, teacher_features and index")
        loss = loss + beta * crd(student_features, teacher_features, index)
    return loss


class _Embed(nn.Module):
    """Linear projection to the contrastive space, L2-normalised."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class CRDLoss(nn.Module):
    """Contrastive representation distillation (Tian, Krishnan and Isola, ICLR 2020).

    Student and teacher penultimate features are projected to ``feat_dim`` L2-normalised
    embeddings. Each side is contrasted against a memory bank of the *other* side's embeddings
    of every training sample (one row per dataset index, updated with ``momentum``): the positive
    is the bank row of the sample itself, ``num_negatives`` rows drawn uniformly at random are
    the negatives (at most ``num_samples - 1``), scores are exp(<v, m> / temperature) normalised
    by a constant estimated on the first batch, and the loss is the NCE objective.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_samples: int,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
    ):
        super().__init__()
        for name, v, low in (("student_dim", student_dim, 1), ("teacher_dim", teacher_dim, 1),
                             ("num_samples", num_samples, 2), ("feat_dim", feat_dim, 1),
                             ("num_negatives", num_negatives, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.num_samples, self.temperature, self.momentum = num_samples, float(temperature), float(momentum)
        self.num_negatives = min(num_negatives, num_samples - 1)
        self.embed_s = _Embed(student_dim, feat_dim)
        self.embed_t = _Embed(teacher_dim, feat_dim)
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(num_samples, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(num_samples, feat_dim) * 2 * bound - bound)
        self.register_buffer("z", torch.full((2,), -1.0))

    def _nce(self, scores: torch.Tensor) -> torch.Tensor:
        """NCE loss of [B, K+1] scores whose column 0 is the positive (noise: uniform over the data)."""
        m_pn = self.num_negatives / self.num_samples
        eps = 1e-7
        log_pos = torch.log(scores[:, 0] / (scores[:, 0] + m_pn + eps))
        log_neg = torch.log(m_pn / (scores[:, 1:] + m_pn + eps))
        return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor,
                index: torch.Tensor) -> torch.Tensor:
        v_s = self.embed_s(student_features)
        v_t = self.embed_t(teacher_features.detach())
        index = index.to(device=v_s.device, dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            raise ValueError(f"index must be dataset indices in 0..{self.num_samples - 1}")
        batch, k = index.shape[0], self.num_negatives
        rows = torch.randint(0, self.num_samples, (batch, k + 1), device=v_s.device)
        rows[:, 0] = index
        out_s = torch.exp(torch.bmm(self.memory_t[rows], v_s.unsqueeze(2)).squeeze(2) / self.temperature)
        out_t = torch.exp(torch.bmm(self.memory_s[rows], v_t.unsqueeze(2)).squeeze(2) / self.temperature)
        if float(self.z[0]) < 0:
            with torch.no_grad():
                self.z.copy_(torch.stack([out_s.mean(), out_t.mean()]).detach() * self.num_samples)
        loss = self._nce(out_s / self.z[0]) + self._nce(out_t / self.z[1])
        with torch.no_grad():
            for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                updated = memory[index] * self.momentum + v.detach() * (1 - self.momentum)
                memory.index_copy_(0, index, F.normalize(updated, dim=1))
        return loss


class IndexedDataset(Dataset):
    """Wraps a dataset of ``(x, y)`` so that it yields ``(x, y, index)`` (CRD needs the index)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i][:2]
        return x, y, i


def with_indices(loader: DataLoader) -> DataLoader:
    """The same loader over :class:`IndexedDataset` (batch size, shuffling, workers kept)."""
    if isinstance(loader.dataset, IndexedDataset):
        return loader
    if loader.batch_size is None:
        raise ValueError("the training loader must batch with batch_size to add sample indices")
    return DataLoader(
        IndexedDataset(loader.dataset),
        batch_size=loader.batch_size,
        shuffle=isinstance(loader.sampler, RandomSampler),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        generator=loader.generator,
    )


def final_classifier(model: nn.Module) -> nn.Linear:
    """The linear layer producing the model's final logits.

    ExitNet: the final exit's classifier; a model with a ``classifier`` attribute: its last
    ``nn.Linear``; otherwise the last ``nn.Linear`` registered in the model.
    """
    if isinstance(model, ExitNet):
        layer = model.classifiers()[-1]
    else:
        scope = model.classifier if isinstance(getattr(model, "classifier", None), nn.Module) else model
        layers = [m for m in scope.modules() if isinstance(m, nn.Linear)]
        layer = layers[-1] if layers else None
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no final nn.Linear classifier to take features from")
    return layer


class PenultimateFeatures:
    """Captures the input of a model's final classifier on every forward (a forward pre-hook)."""

    def __init__(self, model: nn.Module):
        self.layer = final_classifier(model)
        self.features: Optional[torch.Tensor] = None
        self._handle = self.layer.register_forward_pre_hook(self._hook)

    @property
    def dim(self) -> int:
        return self.layer.in_features

    def _hook(self, module, args) -> None:
        self.features = args[0].flatten(1)

    def remove(self) -> None:
        self._handle.remove()


def exit_outputs(
    model: nn.Module, x: torch.Tensor, detach_heads: bool = True, final: bool = True
) -> List[torch.Tensor]:
    """Logits of every exit, ``[head_0, ..., final]``; a plain model gives ``[logits]``.

    With ``detach_heads`` the heads read detached backbone features: their losses train the
    heads only, so the backbone keeps serving the final classifier (heads are always trained
    on a fixed body, as in the early-exit stage). ``final=False`` skips the last segment of an
    ExitNet (head-only training does not need it).
    """
    if not isinstance(model, ExitNet):
        out = model(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]
    outs = []
    for segment, head in zip(model.segments, model.heads):
        x = segment(x)
        outs.append(head(x.detach() if detach_heads else x))
    if final:
        outs.append(model.segments[-1](x))
    return outs


class TaskObjective(nn.Module):
    """Cross-entropy on the final output, plus on every exit head of an ExitNet (heads on detached features).

    ``heads`` / ``final`` weight the head and final terms; ``heads=1, final=0`` trains the heads only.
    """

    def __init__(self, heads: float = 1.0, final: float = 1.0):
        super().__init__()
        _check_weight("heads", heads)
        _check_weight("final", final)
        self.heads_weight, self.final_weight = float(heads), float(final)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index=None) -> torch.Tensor:
        exits = isinstance(model, ExitNet)
        outs = exit_outputs(model, x, final=self.final_weight > 0 or not exits)
        heads = outs[: len(model.heads)] if exits else []
        loss = sum((F.cross_entropy(o, y) for o in heads), x.new_zeros(())) * self.heads_weight
        if len(outs) > len(heads):
            loss = loss + self.final_weight * F.cross_entropy(outs[-1], y)
        return loss


class DistillObjective(nn.Module):
    """gamma * CE + alpha * KD + beta * CRD of a student against a fixed teacher.

    The teacher runs in eval mode without gradients. When both are ExitNets with the same number
    of exits the distillation is exit-aware: student exit i learns (CE + KD) from teacher exit i,
    student heads on detached features; otherwise only the final outputs are distilled (student
    heads, if any, learn from the labels). CRD (``beta > 0``) contrasts the final penultimate
    features and needs batches with sample indices (see :func:`with_indices`).
    """

    def __init__(
        self,
        teacher: nn.Module,
        alpha: float = 0.9,
        beta: float = 0.0,
        gamma: float = 0.1,
        T: float = 4.0,
        crd: Optional[CRDLoss] = None,
        student: Optional[nn.Module] = None,
    ):
        super().__init__()
        check_distill_weights(alpha, beta, gamma, T)
        if beta and crd is None:
            raise ValueError("beta > 0 needs a CRDLoss (crd)")
        self.alpha, self.beta, self.gamma, self.T = float(alpha), float(beta), float(gamma), float(T)
        self.crd = crd if beta else None
        self._teacher = [teacher]
        self._hooks: Optional[Sequence[PenultimateFeatures]] = None
        if self.crd is not None:
            if student is None:
                raise ValueError("CRD needs the student to hook its penultimate features")
            self._hooks = (PenultimateFeatures(student), PenultimateFeatures(teacher))

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    @property
    def needs_index(self) -> bool:
        return self.crd is not None

    def close(self) -> None:
        """Removes the feature hooks (CRD)."""
        if self._hooks is not None:
            for h in self._hooks:
                h.remove()
            self._hooks = None

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index=None) -> torch.Tensor:
        teacher = self.teacher
        teacher.eval()
        with torch.no_grad():
            t_outs = exit_outputs(teacher, x)
        t_feat = self._hooks[1].features if self._hooks else None
        s_outs = exit_outputs(model, x)
        s_feat = self._hooks[0].features if self._hooks else None
        final = distillation_loss(
            s_outs[-1], t_outs[-1], y, self.alpha, self.beta, self.gamma, self.T,
            crd=self.crd, student_features=s_feat, teacher_features=t_feat, index=index,
        )
        if len(s_outs) == 1:
            return final
        if len(t_outs) == len(s_outs):
            heads = [distillation_loss(s, t, y, self.alpha, 0.0, self.gamma, self.T) for s, t in zip(s_outs, t_outs)]
        else:
            heads = [F.cross_entropy(s, y) for s in s_outs]
        return final + sum(heads[:-1])
