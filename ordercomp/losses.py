"""Distillation losses (KD and CRD) and the training objectives.

An *objective* is what :class:`ordercomp.train.Trainer` minimises: a callable
``objective(model, x, y, index) -> loss`` that runs the model itself, so it can also run a
teacher, hook penultimate features or treat the exits of an :class:`~ordercomp.nn.ExitNet`
separately. Objectives are ``nn.Module`` s: their own parameters (the CRD embeddings) are
trained alongside the model's.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import checks
from .errors import ConfigError, DataError
from .nn import ExitNet, Output, PenultimateFeatures, check_output, exit_outputs

__all__ = [
    "kd_loss",
    "distillation_loss",
    "CRDLoss",
    "TaskObjective",
    "DistillObjective",
]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch."""
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T


def _check_weight(name: str, value) -> float:
    return checks.number(name, value, low=0)


def check_distill_weights(alpha, beta, gamma, T) -> None:
    """Validates the loss weights (all >= 0, not all zero) and the temperature (> 0)."""
    weights = [_check_weight(n, v) for n, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma))]
    if not any(weights):
        raise ConfigError("alpha, beta and gamma must not all be 0")
    checks.number("T", T, low=0, low_open=True)


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
            raise ConfigError("beta > 0 needs crd, student_features, teacher_features and index")
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
            checks.integer(name, v, low)
        checks.number("temperature", temperature, low=0, low_open=True)
        checks.number("momentum", momentum, low=0, high=1, high_open=True)
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
            raise DataError(f"index must be dataset indices in 0..{self.num_samples - 1}")
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


def mix(x: torch.Tensor, concentration: float):
    """Mixup (Zhang et al. 2018): ``(lam * x + (1 - lam) * x[perm], perm, lam)`` with ``lam`` drawn from
    Beta(concentration, concentration) and ``perm`` a random permutation of the batch (from the
    global random state, which the trainer seeds)."""
    lam = float(torch.distributions.Beta(concentration, concentration).sample())
    perm = torch.randperm(len(x), device=x.device)
    return lam * x + (1 - lam) * x[perm], perm, lam


def mixed_labels(y: torch.Tensor, perm: torch.Tensor, lam: float, classes: int) -> torch.Tensor:
    """The class probabilities of a mixed batch (``F.cross_entropy`` takes them as targets)."""
    one_hot = F.one_hot(y, classes).float()
    return lam * one_hot + (1 - lam) * one_hot[perm]


class TaskObjective(nn.Module):
    """Cross-entropy on the final output, plus on every exit head of an ExitNet (heads on detached features).

    ``heads`` / ``final`` weight the head and final terms; ``heads=1, final=0`` trains the heads only.
    ``head_kd`` > 0: each head also learns from the network's own final classifier, its loss
    being ``(1 - head_kd) * CE + head_kd * KD(final logits, T)`` (self-distillation: the heads
    imitate the classifier they stand in for). ``output``: where a plain model's logits are in
    its output (see :func:`ordercomp.nn.select_logits`).
    """

    def __init__(self, heads: float = 1.0, final: float = 1.0, output: Output = None, head_kd: float = 0.0,
                 T: float = 4.0):
        super().__init__()
        self.output = check_output(output)
        _check_weight("heads", heads)
        _check_weight("final", final)
        checks.number("head_kd", head_kd, low=0, high=1)
        checks.number("T", T, low=0, low_open=True)
        self.heads_weight, self.final_weight = float(heads), float(final)
        self.head_kd, self.T = float(head_kd), float(T)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index=None) -> torch.Tensor:
        exits = isinstance(model, ExitNet)
        final = self.final_weight > 0 or not exits or self.head_kd > 0
        outs = exit_outputs(model, x, final=final, output=self.output)
        heads = outs[: len(model.heads)] if exits else []
        loss = sum((self._head_loss(o, y, outs[-1]) for o in heads), x.new_zeros(())) * self.heads_weight
        if len(outs) > len(heads) and (self.final_weight or not exits):
            loss = loss + self.final_weight * F.cross_entropy(outs[-1], y)
        return loss

    def _head_loss(self, logits: torch.Tensor, y: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, y)
        if not self.head_kd:
            return ce
        return (1 - self.head_kd) * ce + self.head_kd * kd_loss(logits, final.detach(), self.T)


class DistillObjective(nn.Module):
    """gamma * CE + alpha * KD + beta * CRD of a student against a fixed teacher.

    The teacher runs in eval mode without gradients. When both are ExitNets with the same number
    of exits the distillation is exit-aware: student exit i learns (CE + KD) from teacher exit i,
    student heads on detached features; otherwise only the final outputs are distilled (student
    heads, if any, learn from the labels). CRD (``beta > 0``) contrasts the final penultimate
    features and needs batches with sample indices (see :func:`ordercomp.data.with_indices`).
    ``output``: where plain models' logits are in their outputs (see :func:`ordercomp.nn.select_logits`);
    ``example_input`` finds the final classifiers exactly (see :func:`ordercomp.nn.final_classifier`).
    ``mixup`` > 0: function matching (Beyer et al. 2022, "a good teacher is patient and
    consistent"): each batch is replaced by a mixup of itself with a shuffled copy, the mixing
    weight drawn from Beta(mixup, mixup); teacher and student see the same mixed images, so KD
    matches the teacher's function between the training images, and the CE term takes the mixed labels.
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
        output: Output = None,
        example_input: Optional[torch.Tensor] = None,
        mixup: float = 0.0,
    ):
        super().__init__()
        check_distill_weights(alpha, beta, gamma, T)
        self.mixup = checks.number("mixup", mixup, low=0)
        self.output = check_output(output)
        if beta and crd is None:
            raise ConfigError("beta > 0 needs a CRDLoss (crd)")
        self.alpha, self.beta, self.gamma, self.T = float(alpha), float(beta), float(gamma), float(T)
        self.crd = crd if beta else None
        self._teacher = [teacher]
        self._hooks: Optional[Sequence[PenultimateFeatures]] = None
        if self.crd is not None:
            if student is None:
                raise ConfigError("CRD needs the student to hook its penultimate features")
            self._hooks = (PenultimateFeatures(student, example_input, output),
                           PenultimateFeatures(teacher, example_input, output))

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
        mixed = self.mixup and model.training and len(x) > 1
        if mixed:
            x, perm, lam = mix(x, self.mixup)
        teacher = self.teacher
        teacher.eval()
        with torch.no_grad():
            t_outs = exit_outputs(teacher, x, output=self.output)
        t_feat = self._hooks[1].features if self._hooks else None
        s_outs = exit_outputs(model, x, output=self.output)
        s_feat = self._hooks[0].features if self._hooks else None
        if mixed:
            y = mixed_labels(y, perm, lam, s_outs[-1].shape[1])
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
