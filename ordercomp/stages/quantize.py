"""Q: DoReFa fixed-point quantization-aware training (``ordercomp.nn.quantize_model`` + QAT fine-tuning)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import List, Mapping, Optional

import torch
from torch import nn

from .. import checks
from ..data import unpack
from ..errors import ConfigError
from ..nn import QuantLayer, quantize_model
from .base import Phase, Prepared, Stage
from .mixed import allocate, assignment_bitops, layer_macs, sensitivities

__all__ = ["Quantize", "quantize_new_layers", "activation_sample", "W_BITS", "A_BITS", "CLIPS", "POLICIES",
           "AUTO_OPTIONS"]

W_BITS = (1, 8)
A_BITS = (2, 8)
CLIPS = ("calibrated", "fixed")
POLICIES = ("first_last_8bit", "all", "auto")
AUTO_OPTIONS = tuple((w, a) for a in (8, 6, 4) for w in (8, 6, 4, 3, 2))  # policy="auto" picks per layer from these
AUTO_BATCHES = 2  # calibration batches its sensitivities are measured on
AUTO_NORM_BATCHES = 8  # training batches the 8w8a model's batch-norm statistics are re-estimated on, before


def activation_sample(context, batches: int = 2) -> torch.Tensor:
    """The inputs of the first ``batches`` training batches: what activation clips are measured on."""
    xs = [unpack(batch, "train_loader")[0] for _, batch in zip(range(batches), context.train_loader)]
    return torch.cat(xs).to(context.device) if xs else context.example_input


def quantize_new_layers(model: nn.Module, backbone_classifier: nn.Module, example_input) -> Optional[Mapping]:
    """Quantizes the float conv / linear layers of a partly quantized model the way its quantized layers are.

    Used for exit heads added to a quantized backbone (QE): a head's classifier gets the bits of
    ``backbone_classifier`` (the "last layer" of the policy in force), its other layers the most
    common bits of the quantized layers; the clips start at the largest input seen in
    ``example_input`` (give real batches) and are learned when the backbone's are.
    Returns ``quantize_model``'s report, or None when nothing in the model is quantized.
    """
    quantized = [m for m in model.modules() if isinstance(m, QuantLayer)]
    if not quantized:
        return None
    body = Counter((m.w_bits, m.a_bits) for m in quantized).most_common(1)[0][0]
    last = body
    if isinstance(backbone_classifier, QuantLayer):
        last = (backbone_classifier.w_bits, backbone_classifier.a_bits)

    def policy(name, module, role):
        if isinstance(module, QuantLayer):
            return None
        return last if role == "last" else body

    learn = any(m.learn_alpha for m in quantized)
    _, report = quantize_model(model, *body, policy=policy, example_input=example_input, learn_alpha=learn,
                               alpha="calibrated")
    return report


@dataclass
class Quantize(Stage):
    """Quantize to ``w_bits`` weights / ``a_bits`` activations (DoReFa), then QAT fine-tuning.

    ``policy``: ``"first_last_8bit"`` (first conv and every classifier at 8w8a), ``"all"``, a
    mapping / callable as in :func:`ordercomp.nn.quantize_model`, or ``"auto"``: bits per layer from
    ``AUTO_OPTIONS`` (weights 8/6/4/3/2 by inputs 8/6/4), the ones whose summed sensitivity is least
    (each layer's alone, as the KL divergence of the model's predictions on calibration batches,
    :mod:`.mixed`, on the model at 8w8a with its batch-norm statistics re-estimated when
    ``recalibrate_bn``) within ``bits_per_mac`` times the quantized layers' MACs of BitOps (32: the BitOps
    of 4w8a everywhere); ``w_bits`` / ``a_bits`` are then unused, and the accuracy budget searches
    ``bits_per_mac`` instead of them. ``clip``: where the activation
    clips start: ``"calibrated"`` (each layer's largest input over two training batches: post-ReLU
    activations often exceed 1) or ``"fixed"`` (1.0, DoReFa). ``learn_alpha`` (default on): the
    clips are then learned (PACT) instead of fixed. ``progressive``: lower the weight bits in steps, each
    trained: 8, then halving down to ``w_bits`` (4w: 8 -> 4; 2w: 8 -> 4 -> 2), the first and
    last layers staying at 8 bits. Batch-norm statistics are re-estimated after quantizing and
    after training (``recalibrate_bn``). Order semantics: EQ — on an ExitNet the heads are quantized
    with the body (head classifiers count as last layers); QD — D distils from this quantized
    model; QQ — already quantized layers are re-configured to the new bits; QE — see ``EarlyExit``.
    """

    letter = "Q"
    LADDERS = {"w_bits": (8, 6, 4, 3, 2), "a_bits": (8, 6, 4), "bits_per_mac": (64, 48, 32, 24, 16, 12, 8)}
    w_bits: int = 4
    a_bits: int = 8
    policy: object = "first_last_8bit"
    bits_per_mac: float = 32.0
    clip: str = "calibrated"
    learn_alpha: bool = True
    progressive: bool = False
    recalibrate_bn: bool = field(default=True, kw_only=True)

    def check(self) -> None:
        super().check()
        checks.bits("w_bits", self.w_bits, *W_BITS)
        checks.bits("a_bits", self.a_bits, *A_BITS)
        checks.one_of("clip", self.clip, CLIPS)
        checks.flag("learn_alpha", self.learn_alpha)
        checks.flag("progressive", self.progressive)
        if not (self.policy in POLICIES or isinstance(self.policy, Mapping) or callable(self.policy)):
            raise ConfigError(f"policy must be 'first_last_8bit', 'all', 'auto', a mapping or a callable, "
                              f"got {self.policy!r}")
        checks.number("bits_per_mac", self.bits_per_mac, 8, 64)
        if self.policy == "auto" and self.progressive:
            raise ConfigError("quantize.progressive lowers one weight width in steps; with policy='auto' every layer "
                              "has its own: set progressive=False")
        if isinstance(self.policy, Mapping):
            for name, bits in self.policy.items():
                if bits is None:
                    continue
                if not (isinstance(bits, (tuple, list)) and len(bits) == 2):
                    raise ConfigError(f"quantize.policy[{name!r}] must be [w_bits, a_bits] or None (the layer stays "
                                      f"float), got {bits!r}")
                checks.bits(f"quantize.policy[{name!r}] w_bits", bits[0], *W_BITS, also=(32,))
                checks.bits(f"quantize.policy[{name!r}] a_bits", bits[1], *A_BITS, also=(32,))

    def strengths(self, context=None):
        """``w_bits`` then ``a_bits``; with ``policy="auto"``: ``bits_per_mac``."""
        keep = ("bits_per_mac",) if self.policy == "auto" else ("w_bits", "a_bits")
        return {k: v for k, v in super().strengths(context).items() if k in keep}

    def prepare(self, model: nn.Module, context) -> Prepared:
        """Installs the quantized layers; the phases are QAT fine-tuning (one per bit step)."""
        calibrated = self.clip == "calibrated"
        auto = self.policy == "auto"
        model, report = quantize_model(
            model, *((8, 8, "all") if auto else (self.w_bits, self.a_bits, self.policy)), learn_alpha=self.learn_alpha,
            example_input=activation_sample(context) if calibrated else context.example_input,
            alpha="calibrated" if calibrated else 1.0,
        )
        info = {}
        if auto:
            report, info = self._allocate(model, context)
        phases = self.finetune_phases(context)
        steps = self.bit_steps()
        if phases and len(steps) > 1:
            lowered = [m for m in model.modules() if isinstance(m, QuantLayer) and m.w_bits == self.w_bits]
            phases = [Phase(f"finetune_w{bits}" if bits != self.w_bits else "finetune", phases[0].objective,
                            setup=_set_weight_bits(lowered, bits)) for bits in steps]
        return Prepared(model, phases, {"bits": report, **info, **({"bit_steps": steps} if len(steps) > 1 else {})})

    def _allocate(self, model: nn.Module, context):
        """``policy="auto"``: each quantized layer (at 8w8a) set to its allocated bits; ``(bits, info)``."""
        batches = [unpack(batch, "calibration data")[0].to(context.device)
                   for _, batch in zip(range(AUTO_BATCHES), context.calibration)]
        if self.recalibrate_bn:  # DoReFa rescales every weight: the reference needs statistics of its own
            self._norm_recalibration(context)(model)
        found = sensitivities(model, batches, AUTO_OPTIONS, context.output)
        macs = layer_macs(model, context.example_input)
        limit = self.bits_per_mac * sum(macs[name] for name in found)
        chosen = allocate(macs, found, limit)
        for name, m in model.named_modules():
            if name in chosen:
                m.configure(*chosen[name])
        return chosen, {"sensitivity": {name: found[name][bits] for name, bits in chosen.items()},
                        "bits_per_mac": assignment_bitops(macs, chosen) / sum(macs[name] for name in chosen)}

    @staticmethod
    def _norm_recalibration(context):
        """A function that re-estimates a model's batch-norm statistics on the first
        ``AUTO_NORM_BATCHES`` training batches (the same ones at every call)."""
        norm = [(unpack(batch, "train_loader")[0], None)
                for _, batch in zip(range(AUTO_NORM_BATCHES), context.train_loader)]

        def recalibrate(model: nn.Module) -> None:
            context.trainer.recalibrate_bn(model, norm, len(norm))
        return recalibrate

    def bit_steps(self) -> List[int]:
        """The weight bits trained one after the other: ``[w_bits]``, or 8 halving down to it when ``progressive``."""
        steps = [self.w_bits]
        while self.progressive and steps[0] < 8:
            steps.insert(0, min(8, steps[0] * 2))
        return steps


def _set_weight_bits(layers: List[QuantLayer], bits: int):
    """A phase setup that sets ``layers``' weight bits (their clips and everything else stay)."""
    def setup(model: nn.Module) -> None:
        for m in layers:
            m.configure(w_bits=bits)
    return setup
