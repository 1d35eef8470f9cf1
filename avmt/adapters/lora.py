"""Plain LoRA through peft (``inject_adapter_in_model`` on each scope module), with peft export."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import Adapter, _check_keys

from avmt.errors import UserError

if TYPE_CHECKING:  # peft (and transformers behind it) is imported lazily: `import avmt.adapters` stays light
    from peft import LoraConfig

__all__ = ["LoRA"]


def _exact_regex(names: Sequence[str]) -> str:
    """A regex that ``re.fullmatch``-es exactly the given qualified names (peft's string form)."""
    return "(" + "|".join(re.escape(n) for n in names) + ")"


class LoRA(Adapter):
    """Plain LoRA (peft's ``lora.Linear``) on the matching linear modules of each scope.

    The target patterns are resolved by :class:`~avmt.adapters.base.Adapter` (suffix or
    ``re:`` regex, linear modules only) and handed to peft as an exact regex, so peft adapts
    exactly the modules this class reports in :meth:`injected`.

    Args:
        target_modules, scopes, r, alpha, dropout: see :class:`~avmt.adapters.base.Adapter`.
        use_rslora: peft's rank-stabilized scaling ``alpha / sqrt(r)``.
        adapter_name: peft adapter name used inside the layers (not part of saved keys).
    """

    def __init__(
        self,
        target_modules: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        scopes: Sequence[str] | None = None,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        use_rslora: bool = False,
        adapter_name: str = "default",
    ) -> None:
        super().__init__(target_modules=target_modules, scopes=scopes, r=r, alpha=alpha, dropout=dropout)
        if not adapter_name or "." in adapter_name:
            raise UserError(f"adapter_name must be a non-empty name without '.', got {adapter_name!r}")
        self.use_rslora = bool(use_rslora)
        self.adapter_name = adapter_name
        self._peft_configs: dict[str, LoraConfig] = {}

    def peft_config(self, names: Sequence[str]) -> LoraConfig:
        """The peft ``LoraConfig`` adapting exactly the modules ``names`` (relative to a scope)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=_exact_regex(names),
            bias="none",
            use_rslora=self.use_rslora,
        )

    def _inject(self, scope: str, module: nn.Module, names: list[str]) -> dict[str, nn.Module]:
        from peft import inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        if hasattr(module, "peft_config"):
            raise RuntimeError(
                f"scope {scope!r} ({type(module).__name__}) already holds a peft adapter (attribute peft_config); "
                "apply one LoRA adapter per scope module"
            )
        # peft freezes every non-adapter parameter of the module it injects into; restore the
        # flags afterwards so that the adapter touches nothing but its own parameters.
        flags = [(p, p.requires_grad) for p in module.parameters()]
        cfg = self.peft_config(names)
        inject_adapter_in_model(cfg, module, adapter_name=self.adapter_name)
        for p, flag in flags:
            p.requires_grad_(flag)
        layers: dict[str, nn.Module] = {}
        for n in names:
            layer = module.get_submodule(n)
            if not isinstance(layer, BaseTunerLayer):  # pragma: no cover - would be a peft matching bug
                raise RuntimeError(f"peft did not adapt {scope}.{n} (found {type(layer).__name__})")
            # peft creates its modules in training mode; follow the mode the adapted module was in
            layer.train(layer.get_base_layer().training)
            layers[n] = layer
        self._peft_configs[scope] = cfg
        return layers

    # ------------------------------------------------------------------ parameters / state
    def _scope_adapter_parameters(self, scope: str) -> dict[str, nn.Parameter]:
        tag = f".{self.adapter_name}"
        out: dict[str, nn.Parameter] = {}
        for rel, layer in self._injected_by_scope.get(scope, {}).items():
            for pn, p in layer.named_parameters():
                if pn.startswith("base_layer."):
                    continue
                # peft keys drop the adapter name: lora_A.default.weight -> lora_A.weight
                key = pn.replace(tag + ".", ".")
                key = key[: -len(tag)] if key.endswith(tag) else key
                out[f"{scope}.{rel}.{key}"] = p
        return out

    def _peft_state(self, scope: str) -> dict[str, torch.Tensor]:
        """peft's own adapter state dict of one scope module (keys relative to the scope)."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(
            self._scope_modules[scope], adapter_name=self.adapter_name, save_embedding_layers=False
        )

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """``"<scope>.<module>.lora_A.weight"`` ([r, in]) / ``"….lora_B.weight"`` ([out, r]) → tensor."""
        out: dict[str, torch.Tensor] = {}
        for s in self._scope_modules:
            out.update({f"{s}.{k}": v.detach() for k, v in self._peft_state(s).items()})
        return out

    def load_adapter_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Strict load (ValueError on missing / unexpected keys or shapes), through peft's setter."""
        from peft import set_peft_model_state_dict

        self._require_applied()
        _check_keys(self.adapter_state_dict(), state, type(self).__name__)
        for s, module in self._scope_modules.items():
            sub = {k[len(s) + 1 :]: v for k, v in state.items() if k.startswith(s + ".")}
            result = set_peft_model_state_dict(module, sub, adapter_name=self.adapter_name)
            bad = [k for k in result.unexpected_keys]
            if bad:  # pragma: no cover - keys were checked above
                raise UserError(f"LoRA.load_adapter_state_dict: peft rejected keys {bad[:10]}")

    # ------------------------------------------------------------------ peft export
    def export_peft(
        self, path: str | os.PathLike, base_model_name_or_path: str | None = None, scope: str = "llm"
    ) -> None:
        """Write the adapter of ``scope`` in peft's own format (``adapter_config.json`` +
        ``adapter_model.safetensors``) so that ``peft.PeftModel.from_pretrained(base, path)``
        rebuilds the same model. ``base`` must be the un-adapted scope module (e.g. the causal LM).
        """
        self._require_applied()
        if scope not in self._scope_modules:
            raise ValueError(f"export_peft: unknown scope {scope!r}; adapted scopes: {list(self._scope_modules)}")
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        cfg = copy.deepcopy(self._peft_configs[scope])
        cfg.base_model_name_or_path = None if base_model_name_or_path is None else str(base_model_name_or_path)
        cfg.inference_mode = True
        cfg.save_pretrained(str(path))
        # PeftModel wraps the base as base_model (LoraModel) -> .model: keys gain "base_model.model."
        tensors = {
            f"base_model.model.{k}": v.detach().to("cpu").contiguous() for k, v in self._peft_state(scope).items()
        }
        save_file(tensors, os.path.join(str(path), "adapter_model.safetensors"), metadata={"format": "pt"})
