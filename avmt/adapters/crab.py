"""Conversion of Crab's released I-LoRA weights onto :class:`~avmt.adapters.ilora.ILoRA` layers.

Crab (GeWu-Lab) stores, per adapted linear ``<layer>``::

    <layer>.lora_A.weight      [r, in]
    <layer>.lora_B{i}.weight   [out, r]     i = 0 .. K-1
    <layer>.lora_route.weight  [K, in]

(optionally with a peft adapter name before ``.weight``, e.g. ``lora_A.default.weight``), where
``<layer>`` is the module path in Crab's model, e.g.
``base_model.model.model.layers.0.self_attn.q_proj``. Each Crab layer is mapped to the adapted
layer whose scope-relative name is the longest ``.``-bounded suffix of it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping

import torch

from .ilora import ILoRA, ILoRALinear

from avmt.errors import UserError

__all__ = ["convert_crab_state_dict"]

_KEY = re.compile(r"^(?P<layer>.+?)\.(?P<kind>lora_A|lora_B(?P<idx>\d+)|lora_route)(?:\.[A-Za-z_][\w-]*)?\.weight$")


def _match_layer(crab_layer: str, ours: dict[str, tuple[str, str]]) -> str:
    """Our full layer name for a Crab layer path (ValueError if none or ambiguous)."""
    if crab_layer in ours:
        return crab_layer
    best: list[str] = []
    best_len = -1
    for full, (_scope, rel) in ours.items():
        if crab_layer == rel or crab_layer.endswith("." + rel):
            if len(rel) > best_len:
                best, best_len = [full], len(rel)
            elif len(rel) == best_len:
                best.append(full)
    if not best:
        raise UserError(f"convert_crab_state_dict: Crab layer {crab_layer!r} matches no I-LoRA layer of the adapter")
    if len(best) > 1:
        raise UserError(f"convert_crab_state_dict: Crab layer {crab_layer!r} is ambiguous between {best}")
    return best[0]


def convert_crab_state_dict(
    state: Mapping[str, torch.Tensor], adapter: ILoRA, ignore_other_keys: bool = False
) -> dict[str, torch.Tensor]:
    """Map a Crab I-LoRA state dict onto ``adapter.adapter_state_dict()`` keys, checking everything.

    Args:
        state: Crab's tensors (``…lora_A.weight [r, in]``, ``…lora_B{i}.weight [out, r]``,
            ``…lora_route.weight [K, in]``).
        adapter: an applied :class:`ILoRA`.
        ignore_other_keys: skip keys that are not LoRA keys (projectors, embeddings, ... of a
            full Crab checkpoint); by default they raise so that nothing is dropped silently.

    Returns:
        ``{"<scope>.<layer>.lora_A": [r, in], "….lora_B": [K, out, r], "….lora_router": [K, in]}``
        for every adapted layer, ready for ``adapter.load_adapter_state_dict``.

    Raises:
        ValueError: unknown / unparsable LoRA key, Crab layer matching no adapted layer (or
            several), adapted layer missing from ``state``, missing A / route / head, head indices
            not 0..K-1, or a shape (head count included) differing from the adapter's, naming the
            layer, the expected and the found shapes.
    """
    if not isinstance(adapter, ILoRA):
        raise TypeError(f"convert_crab_state_dict needs an ILoRA adapter, got {type(adapter).__name__}")
    adapter._require_applied()
    ours: dict[str, tuple[str, str]] = {}
    layers: dict[str, ILoRALinear] = {}
    for scope, by_rel in adapter._injected_by_scope.items():
        for rel, layer in by_rel.items():
            ours[f"{scope}.{rel}"] = (scope, rel)
            layers[f"{scope}.{rel}"] = layer

    groups: dict[str, dict[str, object]] = defaultdict(lambda: {"B": {}})
    sources: dict[str, str] = {}
    others: list[str] = []
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m is None:
            if ".lora_" in key or key.startswith("lora_"):
                raise UserError(
                    f"convert_crab_state_dict: unrecognized LoRA key {key!r} (expected <layer>.lora_A.weight, "
                    f"<layer>.lora_B<i>.weight or <layer>.lora_route.weight)"
                )
            others.append(key)
            continue
        full = _match_layer(m["layer"], ours)
        prev = sources.setdefault(full, m["layer"])
        if prev != m["layer"]:
            raise UserError(
                f"convert_crab_state_dict: Crab layers {prev!r} and {m['layer']!r} both map to {full!r}"
            )
        g = groups[full]
        kind = m["kind"]
        if kind == "lora_A" or kind == "lora_route":
            if kind in g:
                raise UserError(f"convert_crab_state_dict: duplicate {kind} for layer {full!r} ({key!r})")
            g[kind] = tensor
        else:
            idx = int(m["idx"])
            if idx in g["B"]:
                raise UserError(f"convert_crab_state_dict: duplicate lora_B{idx} for layer {full!r} ({key!r})")
            g["B"][idx] = tensor
    if others and not ignore_other_keys:
        shown = sorted(others)[:10]
        raise UserError(
            f"convert_crab_state_dict: {len(others)} key(s) are not I-LoRA weights, e.g. {shown}; "
            f"pass ignore_other_keys=True to skip them"
        )
    missing_layers = sorted(set(ours) - set(groups))
    if missing_layers:
        shown = missing_layers[:10] + ([f"... ({len(missing_layers)} in all)"] if len(missing_layers) > 10 else [])
        raise UserError(f"convert_crab_state_dict: no Crab weights for adapted layer(s) {shown}")

    out: dict[str, torch.Tensor] = {}
    for full, g in groups.items():
        layer = layers[full]
        k, r, d_in, d_out = layer.num_heads, layer.r, layer.in_features, layer.out_features
        crab = sources[full]
        for kind in ("lora_A", "lora_route"):
            if kind not in g:
                raise UserError(f"convert_crab_state_dict: layer {full!r} (Crab {crab!r}) has no {kind}.weight")
        heads: dict[int, torch.Tensor] = g["B"]  # type: ignore[assignment]
        if sorted(heads) != list(range(len(heads))):
            raise UserError(
                f"convert_crab_state_dict: layer {full!r} (Crab {crab!r}) has heads lora_B{sorted(heads)}; "
                f"expected lora_B0 .. lora_B{k - 1}"
            )
        if len(heads) != k:
            shape_b = tuple(next(iter(heads.values())).shape) if heads else ()
            raise UserError(
                f"convert_crab_state_dict: layer {full!r} (Crab {crab!r}): expected lora_B of shape "
                f"{(k, d_out, r)} ({k} heads), found {(len(heads), *shape_b)} ({len(heads)} heads); "
                f"set the adapter's num_heads={len(heads)} to load this checkpoint"
            )
        checks = [("lora_A", g["lora_A"], (r, d_in)), ("lora_route", g["lora_route"], (k, d_in))]
        checks += [(f"lora_B{i}", heads[i], (d_out, r)) for i in range(k)]
        for name, t, expected in checks:
            if tuple(t.shape) != expected:
                raise UserError(
                    f"convert_crab_state_dict: layer {full!r} (Crab {crab!r}) {name}.weight: "
                    f"expected shape {expected}, found {tuple(t.shape)}"
                )
        out[f"{full}.lora_A"] = g["lora_A"]
        out[f"{full}.lora_B"] = torch.stack([heads[i] for i in range(k)], dim=0)
        out[f"{full}.lora_router"] = g["lora_route"]
    return out
