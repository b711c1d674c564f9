"""Every order of D, P, Q, E runs end to end on real digits; order-specific meanings; bad input fails first."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import count_accuracy, paying_exits
from test_stages import Untouchable, _Untraceable, context, one_thread, teacher  # noqa: F401  (one_thread: fixture)
from torch import nn

from ordercomp import bitops, models
from ordercomp.nn import ExitNet, QuantLayer, QuantLinear
from ordercomp.pipeline import run_order, runner
from ordercomp.stages import Distill, EarlyExit, Prune, Quantize, parse_order, plan_order

PERMUTATIONS = ["".join(p) for p in itertools.permutations("DPQE")]
SUBSETS = ["".join(c) for n in (1, 2, 3) for c in itertools.combinations("DPQE", n)]
REPEATS = ["DD", "PP", "QQ"]


def _quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLayer) and m.w_bits < 32 for m in model.modules())


class Counted:
    """A stage runner that counts the accuracy of each stage's model right after the stage (later
    stages change models in place), in the order the stages ran."""

    def __init__(self):
        self.seen = []

    def __call__(self, stage, model, context, **kwargs):
        result = runner.run_stage(stage, model, context, **kwargs)
        self.seen.append(count_accuracy(result.model, context.val_loader))
        return result


@pytest.mark.slow
@pytest.mark.parametrize("order", PERMUTATIONS + SUBSETS + REPEATS)
def test_every_order_runs_end_to_end(order):
    original = teacher()
    ctx = context(original)
    counted = Counted()
    model, results = run_order(original, order, {"E": paying_exits()}, ctx, runner=counted)
    assert [r.stage for r in results] == list(order)
    final = results[-1]
    assert final.model is model
    # each accuracy is the one counted from the stage's own predictions (dynamic exits at its threshold)
    assert [r.accuracy for r in results] == pytest.approx(counted.seen, abs=1e-9)
    profile = bitops.profile(model, ctx.example_input)
    assert final.params == profile.params == sum(p.numel() for p in model.parameters())
    assert isinstance(model, ExitNet) == ("E" in order)
    assert _quantized(model) == ("Q" in order and order.rindex("Q") > order.rfind("D"))  # D makes a float student
    # BitOps: static for a plain model, the chosen threshold's expectation for one with exits
    assert final.bitops == (final.info["exit"]["validation"]["expected_bitops"] if "E" in order else profile.bitops)
    original_profile = bitops.profile(teacher(), ctx.example_input)
    assert final.bitops_cr == pytest.approx(original_profile.bitops / final.bitops, rel=1e-12)
    assert final.cr == pytest.approx(original_profile.storage_bits / profile.storage_bits, rel=1e-12)
    assert final.bitops_cr >= 1.0  # E's choice is never dearer than running the plain body
    if set(order) & set("DPQ"):
        assert final.bitops_cr > 1.5
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), teacher().state_dict().values()))


def test_pd_distils_from_the_pruned_teacher():
    original = teacher()
    _, (p, d) = run_order(original, "PD", None, context(original))
    assert d.info["teacher_params"] == p.params < sum(t.numel() for t in original.parameters())


@pytest.mark.slow
def test_qd_distils_from_the_quantized_teacher():
    original = teacher()
    _, (q, d) = run_order(original, "QD", None, context(original))
    assert d.info["teacher_bitops"] == bitops.profile(q.model, context(original).example_input).bitops
    assert d.info["teacher_bitops"] < bitops.profile(original, context(original).example_input).bitops / 10
    assert not _quantized(d.model)


def test_ed_student_exits_learn_from_the_teacher_exits():
    original = teacher()
    _, (e, d) = run_order(original, "ED", {"E": paying_exits()}, context(original))
    assert d.info["exit_aware"] and isinstance(d.model, ExitNet)
    assert d.model.num_exits == e.model.num_exits and d.info["student_params"] < d.info["teacher_params"]
    assert d.model.threshold == d.info["exit"]["threshold"]


def test_ep_prunes_body_and_heads_together():
    original = teacher()
    ctx = context(original)
    _, (e, p) = run_order(original, "EP", {"E": paying_exits(head="pool")}, ctx)
    assert [h.fc.in_features for h in p.model.heads] == [8, 16]  # resnet8 stages 16, 32 at ratio 0.5
    assert all(h.fc.out_features == 10 for h in p.model.heads)


def test_pe_trains_heads_on_the_pruned_body():
    original = teacher()
    _, (p, e) = run_order(original, "PE", {"E": paying_exits(head="pool")}, context(original))
    assert [h.fc.in_features for h in e.model.heads] == [8, 16]


@pytest.mark.parametrize("order", ["EQ", "QE"])
def test_heads_are_quantized_in_eq_and_qe(order):
    original = teacher()
    model, _ = run_order(original, order, {"Q": Quantize(w_bits=2, a_bits=4), "E": paying_exits(head="conv")},
                         context(original))
    for head in model.heads:
        assert (head.conv.w_bits, head.conv.a_bits) == (2, 4)
        assert isinstance(head.fc, QuantLinear) and (head.fc.w_bits, head.fc.a_bits) == (8, 8)


@pytest.mark.slow
def test_repeats_compress_further():
    original = teacher()
    ctx = context(original)
    _, (d1, d2) = run_order(original, "DD", None, ctx)
    assert d2.params < d1.params < sum(t.numel() for t in original.parameters())
    _, (p1, p2) = run_order(original, "PP", {"P": [Prune(0.25), Prune(0.5)]}, ctx)
    assert p2.macs < p1.macs and p2.info["removed_fraction"] > 0.4
    model, (q1, q2) = run_order(original, "QQ", {"Q": [Quantize(8, 8), Quantize(2, 4)]}, ctx)
    assert q2.bitops < q1.bitops and model.features.layer2[0].conv1.w_bits == 2


def test_order_strings_are_checked():
    assert parse_order("dpqe") == "DPQE"
    bad_orders = (("DPX", "unknown: X"), ("", "non-empty string"), (None, "non-empty string"), ("D-P", "unknown: -"))
    for bad, message in bad_orders:
        with pytest.raises(ValueError, match=message):
            parse_order(bad)
    with pytest.raises(ValueError, match=r"stages has keys \['X'\]"):
        plan_order("DP", {"X": Prune()})
    with pytest.raises(TypeError, match=r"stages\['P'\] must be a Prune, got Quantize"):
        plan_order("DP", {"P": Quantize()})
    assert [s.ratio for s in plan_order("PPP", {"P": [Prune(0.2), Prune(0.3)]})] == [0.2, 0.3, 0.3]


def _bad(stage, field, value):
    setattr(stage, field, value)  # configs are mutable: run_order checks them again
    return stage


@pytest.mark.parametrize(
    "order, stages, error, message",
    [
        ("DPX", None, ValueError, "unknown: X"),
        ("DP", {"P": _bad(Prune(), "ratio", 1.5)}, ValueError, r"ratio must be a number in \(0, 1\)"),
        ("DQ", {"Q": _bad(Quantize(), "w_bits", 0)}, ValueError, "w_bits must be an integer in 1..8, got 0"),
        ("EQ", {"Q": _bad(Quantize(), "a_bits", 9)}, ValueError, "a_bits must be an integer in 2..8, got 9"),
        ("PD", {"D": Distill(student=models.create("resnet8", num_classes=7, in_channels=1))}, ValueError,
         "student has 7 output classes but the teacher has 10"),
        ("EP", {"E": _bad(EarlyExit(), "max_accuracy_loss", -3)}, ValueError, "max_accuracy_loss must be"),
    ],
)
def test_bad_input_fails_before_any_training(order, stages, error, message):
    original = teacher()
    ctx = context(original, train_loader=Untouchable())
    with pytest.raises(error, match=message):
        run_order(original, order, stages, ctx)


def test_untraceable_models_fail_before_training_naming_the_layer():
    model = _Untraceable()
    ctx = context(model, train_loader=Untouchable())
    for order in ("QP", "D"):  # D would shrink a copy of it
        with pytest.raises(ValueError, match="layer 'conv1' is not on the autograd path"):
            run_order(model, order, None, ctx)
