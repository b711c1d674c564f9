"""Result files: a compressed model as tensors plus a JSON recipe, loadable without unpickling.

The recipe says how to rebuild the module structure: the base architecture (a zoo name with
its kwargs, or a class the caller supplies), the exit heads, the shape of every conv / linear
/ batch-, layer- or group-norm layer and of every other module's own tensors (pruning changes
them) and the bits of every quantized layer. :func:`build`
follows it to make a model with the right shapes, and :func:`load` fills in the tensors. A
``.pt`` file is read with ``torch.load(weights_only=True)``; a ``.safetensors`` file keeps the
recipe in its metadata.
"""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from . import models
from .checkpoint import atomic_write
from .errors import ConfigError, MissingDependencyError, MissingFileError, ModelError, reason
from .nn import ExitNet, Output, QuantConv2d, QuantLayer, QuantLinear, attach_exits
from .nn.quant import replace_modules

__all__ = ["FORMAT", "VERSION", "NotAResultError", "architecture", "recipe", "save", "read", "is_result", "build",
           "load", "load_with_recipe"]

FORMAT = "ordercomp-result"
VERSION = 1

_METADATA_KEY = "ordercomp_recipe"
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def architecture(model: nn.Module, zoo_spec: Optional[Tuple[str, dict]] = None) -> dict:
    """JSON description of ``model``'s architecture, as the recipe's ``original`` / ``base`` need it.

    ``{"zoo": name, "kwargs": {...}, "num_classes": n, "in_channels": c}`` for a zoo model
    (``zoo_spec`` = ``(name, kwargs)``, else found by ``models.identify``); otherwise
    ``{"class": "module.QualName"}``, which :func:`build` needs an instance of.
    """
    zoo_spec = zoo_spec if zoo_spec is not None else models.identify(model)
    if zoo_spec is None:
        return {"class": _class_name(type(model))}
    sizes = models._io_sizes(model)
    if sizes is None:
        raise ModelError(f"zoo_spec was given but {type(model).__name__} has no nn.Linear and nn.Conv2d to size it from")
    name, kwargs = zoo_spec
    return {"zoo": name, "kwargs": dict(kwargs), "num_classes": sizes[0], "in_channels": sizes[1]}


def _layer(m: nn.Module) -> Optional[dict]:
    if isinstance(m, nn.Conv2d):
        return {"type": "conv", "in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
    if isinstance(m, nn.Linear):
        return {"type": "linear", "in_features": m.in_features, "out_features": m.out_features}
    if isinstance(m, _BATCHNORMS):
        return {"type": "bn", "num_features": m.num_features}
    if isinstance(m, nn.LayerNorm):  # ConvNeXt's; pruning shortens its normalized shape
        return {"type": "ln", "normalized_shape": list(m.normalized_shape)}
    if isinstance(m, nn.GroupNorm):
        return {"type": "gn", "num_groups": m.num_groups, "num_channels": m.num_channels}
    return None


def recipe(model: nn.Module, *, original: dict, base: dict, input_shape: Sequence[int],
           info: Optional[dict] = None) -> dict:
    """The JSON recipe of ``model``: what :func:`build` needs to remake its structure.

    ``original`` and ``base`` are :func:`architecture` dicts: the model compression started
    from, and the one ``model`` was cut from (the original, or the distillation student).
    ``input_shape`` is ``[C, H, W]`` (exit heads are sized with it). ``info`` is kept as is.
    """
    shape = [int(s) for s in input_shape]
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"input_shape must be [C, H, W] of positive integers, got {list(input_shape)!r}")
    layers, bits, tensors = {}, {}, {}
    for name, m in model.named_modules():
        facts = _layer(m)
        if facts is not None:
            layers[name] = facts
        else:  # a module's own tensors beside the layers (a layer scale pruning shortened)
            for key, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                tensors[f"{name}.{key}" if name else key] = list(t.shape)
        if isinstance(m, QuantLayer):
            bits[name] = {"w_bits": m.w_bits, "a_bits": m.a_bits, "signed_input": m.signed_input,
                          "learn_alpha": m.learn_alpha}
    exits = None
    if isinstance(model, ExitNet):
        state = model.get_extra_state()
        exits = {k: state[k] for k in ("points", "head_kind", "head_kwargs", "threshold", "criterion", "output")}
    out = {"format": FORMAT, "version": VERSION, "original": original, "base": base, "input_shape": shape,
           "layers": layers, "bits": bits, "exits": exits, "tensors": tensors, "info": info or {}}
    try:
        json.dumps(out)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"original, base and info must hold only JSON values: {e}") from None
    return out


def _safetensors():
    """The safetensors package (an optional dependency: the ``safetensors`` extra)."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise MissingDependencyError(".safetensors result files need the safetensors package: "
                          "pip install 'ordercomp[safetensors]' (or use a .pt file)") from None
    return safetensors


def save(path, model: nn.Module, recipe: dict) -> Path:
    """Writes ``model``'s state and ``recipe`` to one file, atomically; returns its path.

    ``.safetensors``: the tensors (exit settings live in the recipe) with the recipe as JSON
    metadata. Any other suffix: ``torch.save`` of ``{"format", "version", "recipe",
    "state_dict"}``, readable with ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    _check_recipe(recipe)
    if path.suffix == ".safetensors":
        save_safetensors = _safetensors().torch.save
        tensors = {k: v.detach().cpu().clone().contiguous()  # clones: safetensors refuses shared storage
                   for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        data = save_safetensors(tensors, metadata={_METADATA_KEY: json.dumps(recipe)})
        return atomic_write(path, lambda f: f.write(data))
    state = model.state_dict()
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            state[k] = v.detach().cpu().contiguous()
    payload = {"format": FORMAT, "version": VERSION, "recipe": recipe, "state_dict": state}
    return atomic_write(path, lambda f: torch.save(payload, f))


class NotAResultError(ModelError):
    """A file that :func:`save` did not write; ``pickled`` when it holds pickled Python objects
    (e.g. a model saved whole), which ordercomp never unpickles on its own."""

    def __init__(self, message: str, pickled: bool = False):
        super().__init__(message)
        self.pickled = pickled


def _not_a_result(path: Path, why: str, pickled: bool = False) -> NotAResultError:
    return NotAResultError(f"{path} is not an ordercomp result: {why}", pickled)


def _check_recipe(recipe, path: Optional[Path] = None) -> dict:
    where = f"the recipe in {path}" if path is not None else "recipe"
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise ModelError(f"{where} is not an ordercomp recipe (its format must be {FORMAT!r})")
    version = recipe.get("version")
    if version != VERSION:
        raise ModelError(f"{where} has version {version!r}; this ordercomp reads version {VERSION}")
    missing = sorted({"original", "base", "input_shape", "layers", "bits", "exits"} - set(recipe))
    if missing:
        raise ModelError(f"{where} lacks the keys {missing}")
    return recipe


def read(path) -> Tuple[dict, dict]:
    """``(recipe, state_dict)`` of a file written by :func:`save`, read without unpickling."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no result file at {path}")
    if path.suffix == ".safetensors":
        SafetensorError, safe_open = _safetensors().SafetensorError, _safetensors().safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get(_METADATA_KEY)
                state = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise _not_a_result(path, f"not a safetensors file ({e})") from None
        if text is None:
            raise _not_a_result(path, f"its metadata has no {_METADATA_KEY!r}")
        try:
            recipe = json.loads(text)
        except json.JSONDecodeError as e:
            raise _not_a_result(path, f"its recipe is not valid JSON ({reason(e)})") from None
        return _check_recipe(recipe, path), state
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _not_a_result(path, "it holds pickled Python objects, which are never unpickled here", True) from None
    except Exception as e:  # a text file, a truncated or corrupt archive: reading arbitrary bytes can raise anything
        raise _not_a_result(path, f"torch cannot read it ({reason(e)})") from None
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise _not_a_result(path, "it holds a state dict (weights without the architecture), not a model")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
        raise _not_a_result(path, f"it holds no {FORMAT!r} record")
    if payload.get("version") != VERSION:
        raise _not_a_result(path, f"it has version {payload.get('version')!r}; this ordercomp reads version {VERSION}")
    return _check_recipe(payload.get("recipe"), path), payload["state_dict"]


def is_result(path) -> bool:
    """True when ``path`` is a file written by :func:`save` (checked weights-only, never unpickled)."""
    try:
        read(path)
    except (ValueError, OSError):
        return False
    return True


# --------------------------------------------------------------------------- rebuilding


def _base_model(base: dict, original: dict, model: Optional[nn.Module], student: Optional[nn.Module]) -> nn.Module:
    if "zoo" in base:
        return models.create(base["zoo"], num_classes=base["num_classes"], in_channels=base["in_channels"],
                             **base.get("kwargs", {}))
    cls = base.get("class")
    if not isinstance(cls, str):
        raise ModelError(f"recipe base must name a zoo model or a class, got {base!r}")
    for given in (student, model):
        if given is not None and _class_name(type(given)) == cls:
            return copy.deepcopy(given)
    if "zoo" in original:
        candidate = _base_model(original, original, None, None)
        if _class_name(type(candidate)) == cls:
            return candidate
    raise ModelError(
        f"this result was cut from a {cls} model: pass an instance of it as model= "
        f"(or as student= when it is the distillation student)"
    )


def _empty_like(old: Optional[torch.Tensor], shape: Tuple[int, ...]) -> Optional[torch.Tensor]:
    if old is None:
        return None
    new = torch.empty(shape, dtype=old.dtype, device=old.device)
    return nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new


def _resize(name: str, m: nn.Module, facts: dict) -> None:
    """Gives layer ``m`` the recorded shape, with uninitialised tensors (the state dict fills them)."""
    kind = facts.get("type")
    if _layer(m) is None or _layer(m)["type"] != kind:
        raise ModelError(f"layer {name!r} is a {kind} layer in the recipe but a {type(m).__name__} in the model")
    if kind == "conv":
        m.in_channels, m.out_channels, m.groups = facts["in_channels"], facts["out_channels"], facts["groups"]
        if m.in_channels % m.groups or m.out_channels % m.groups:
            raise ModelError(
                f"layer {name!r}: channels {m.in_channels}->{m.out_channels} are not divisible by groups {m.groups}"
            )
        weight = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
        m.weight, m.bias = _empty_like(m.weight, weight), _empty_like(m.bias, (m.out_channels,))
    elif kind == "linear":
        m.in_features, m.out_features = facts["in_features"], facts["out_features"]
        m.weight = _empty_like(m.weight, (m.out_features, m.in_features))
        m.bias = _empty_like(m.bias, (m.out_features,))
    elif kind == "ln":
        shape = m.normalized_shape = tuple(facts["normalized_shape"])
        m.weight, m.bias = _empty_like(m.weight, shape), _empty_like(m.bias, shape)
    elif kind == "gn":
        m.num_groups, n = facts["num_groups"], facts["num_channels"]
        m.num_channels = n
        m.weight, m.bias = _empty_like(m.weight, (n,)), _empty_like(m.bias, (n,))
    else:
        n = m.num_features = facts["num_features"]
        m.weight, m.bias = _empty_like(m.weight, (n,)), _empty_like(m.bias, (n,))
        if m.running_mean is not None:
            m.running_mean, m.running_var = _empty_like(m.running_mean, (n,)), _empty_like(m.running_var, (n,))


def _quantize(model: nn.Module, modules: Dict[str, nn.Module], bits: Dict[str, dict]) -> nn.Module:
    replaced: Dict[nn.Module, nn.Module] = {}
    for name, b in bits.items():
        m = modules[name]
        settings = dict(signed_input=b["signed_input"], learn_alpha=b["learn_alpha"])
        if isinstance(m, QuantLayer):
            m.configure(b["w_bits"], b["a_bits"], **settings)
        elif type(m) in (nn.Conv2d, nn.Linear):
            cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
            replaced[m] = cls.from_float(m, b["w_bits"], b["a_bits"], **settings)
        else:
            raise ModelError(f"layer {name!r} is quantized in the recipe but is a {type(m).__name__} in the model")
    return replace_modules(model, replaced)


def build(recipe: dict, model: Optional[nn.Module] = None, student: Optional[nn.Module] = None,
          output: Output = None) -> nn.Module:
    """The module structure ``recipe`` describes, with uninitialised weights.

    The base architecture comes from the zoo, or is a copy of ``student`` / ``model`` when the
    recipe names their class (a thinner copy keeps the class of the model it came from; a
    zoo original also serves for its own class). Then exits are attached, every recorded
    conv / linear / BatchNorm layer gets its recorded shape, recorded layers are quantized,
    and the exit threshold and criterion are set. ``output``: where the base model's logits are
    (see :func:`ordercomp.nn.select_logits`), for exits cut with a callable, which the recipe
    cannot record (default: the recorded key or index).
    """
    _check_recipe(recipe)
    net = _base_model(recipe["base"], recipe["original"], model, student)
    exits = recipe["exits"]
    if exits is not None:
        kind = exits["head_kind"]
        if kind == "custom":
            raise ModelError(
                "cannot rebuild exit heads of kind 'custom' (made by a callable or passed directly): "
                "build the ExitNet yourself and load the state dict from read()"
            )
        ref = next(net.parameters(), None)
        example = torch.zeros(2, *recipe["input_shape"], device=None if ref is None else ref.device)
        output = exits.get("output") if output is None else output
        net = attach_exits(net, exits["points"], kind, example_input=example, output=output,
                           **exits["head_kwargs"])
    modules = dict(net.named_modules())
    for name in [*recipe["layers"], *recipe["bits"]]:
        if name not in modules:
            raise ModelError(f"the recipe names layer {name!r}, which the rebuilt {type(net).__name__} lacks")
    for name, facts in recipe["layers"].items():
        _resize(name, modules[name], facts)
    for name, shape in recipe.get("tensors", {}).items():  # files written before 2026-12 have none
        owner, _, key = name.rpartition(".")
        m = modules.get(owner)
        if m is None or getattr(m, key, None) is None:
            raise ModelError(f"the recipe names tensor {name!r}, which the rebuilt {type(net).__name__} lacks")
        if list(getattr(m, key).shape) != list(shape):
            setattr(m, key, _empty_like(getattr(m, key), tuple(shape)))
    net = _quantize(net, modules, recipe["bits"])
    if exits is not None:
        net.threshold, net.criterion = exits["threshold"], exits["criterion"]
    return net


def load_with_recipe(path, model: Optional[nn.Module] = None, student: Optional[nn.Module] = None,
                     map_location="cpu", output: Output = None) -> Tuple[nn.Module, dict]:
    """:func:`load`, also returning the file's recipe (the file is read once)."""
    recipe_, state = read(path)
    try:
        net = build(recipe_, model=model, student=student, output=output)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a recipe edited past its schema check
        raise ModelError(f"{path}: its recipe cannot be rebuilt ({reason(e)}): the file was changed or "
                         "damaged") from None
    for key, value in net.state_dict().items():
        if not isinstance(value, torch.Tensor):
            state.setdefault(key, value)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).strip().splitlines()[1:] if line.strip()]
        detail = "; ".join(lines[:2]) + ("; ..." if len(lines) > 2 else "")
        raise ModelError(f"{path}: its tensors do not fit the model its recipe describes ({detail}): the file was "
                         "changed or damaged, or its recipe names another architecture") from None
    return net.to(map_location).eval(), recipe_


def load(path, model: Optional[nn.Module] = None, student: Optional[nn.Module] = None,
         map_location="cpu", output: Output = None) -> nn.Module:
    """The model saved at ``path`` by :func:`save`, rebuilt and filled, in eval mode.

    ``model`` / ``student``: instances of the base class when the base is not a zoo model
    (see :func:`build`); their weights are not used. ``output``: see :func:`build`.
    """
    return load_with_recipe(path, model, student, map_location, output)[0]
