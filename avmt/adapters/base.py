"""Adapter base class: injection by module-name pattern within named scopes.

An adapter is configured once (targets, scopes, rank, ...) and then ``apply``-ed to a dict of
scope modules, e.g. ``{"llm": causal_lm, "vision": vision_tower}``. It replaces / wraps the
matching ``nn.Linear`` modules *in place* and keeps references to the adapted layers; it owns no
parameters itself (they live inside the model, so the model's ``state_dict`` and ``.to()`` cover
them and nothing is registered twice).

Target patterns (``target_modules``):

* ``"q_proj"`` matches a module whose qualified name, relative to its scope module, equals
  ``q_proj`` or ends with ``.q_proj`` (so ``"self_attn.q_proj"`` works too);
* ``"re:<regex>"`` matches when ``re.fullmatch(regex, qualified_name)`` succeeds.

Only ``nn.Linear`` modules are candidates; modules that already belong to an adapted layer
(peft LoRA layers, I-LoRA / MoE-LoRA layers) are never candidates.

Freezing policy: the adapter's own parameters are made trainable; the ``requires_grad`` flags
of every other parameter are left exactly as they were (freezing the backbone is the model's
decision, not the adapter's).
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from avmt.errors import UserError

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

__all__ = ["Adapter", "DEFAULT_TARGET_MODULES", "AdaptedLayer", "count_parameters", "match_target"]


class AdaptedLayer(nn.Module):
    """Marker base class of layers written in this package (I-LoRA, MoE-LoRA).

    Subclasses hold the frozen layer as ``base_layer`` and name every adapter parameter with the
    prefix ``lora_``. Optional hooks used by :class:`Adapter`: ``aux_loss() -> Tensor | None``,
    ``router_mean() -> Tensor [K] | None``, ``router_entropy() -> Tensor [] | None``,
    ``reset_router_stats()``.
    """

    base_layer: nn.Module

    def adapter_named_parameters(self) -> dict[str, nn.Parameter]:
        """Adapter parameters of this layer (everything outside ``base_layer``), by local name."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}


def _is_adapted(module: nn.Module) -> bool:
    if isinstance(module, AdaptedLayer):
        return True
    # peft tuner layers (LoRA and friends); if peft was never imported, no such layer can exist
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    base_cls = getattr(tuners, "BaseTunerLayer", None)
    return base_cls is not None and isinstance(module, base_cls)


def match_target(pattern: str, name: str) -> bool:
    """True when the qualified module ``name`` matches one target ``pattern``.

    ``"re:<regex>"`` → ``re.fullmatch``; anything else → equality or ``.``-bounded suffix match.
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def linear_module_names(module: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules of ``module`` that can still be adapted.

    Linear layers inside an already adapted layer (a peft LoRA layer's ``lora_A``, an I-LoRA
    layer's ``base_layer``) are left out.
    """
    names: list[str] = []
    adapted_prefixes: list[str] = []
    for name, sub in module.named_modules():
        if any(name.startswith(p + ".") for p in adapted_prefixes):
            continue
        if _is_adapted(sub):
            adapted_prefixes.append(name)
            continue
        if isinstance(sub, nn.Linear) and name:
            names.append(name)
    return names


class Adapter(nn.Module):
    """Base class of the LoRA / MoE-LoRA / I-LoRA adapter plugins.

    Args:
        target_modules: patterns of the linear modules to adapt (see module docstring), either one
            list for every scope or a dict ``scope -> list``. Default: the seven projections of a
            Llama/Qwen block.
        scopes: names of the scope modules this adapter is applied to (keys of the dict given to
            :meth:`apply`), e.g. ``["llm"]`` or ``["llm", "vision"]``.
        r: LoRA rank.
        alpha: LoRA alpha; the update is scaled by ``alpha / r``.
        dropout: dropout probability on the adapter input.
    """

    def __init__(
        self,
        target_modules: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        scopes: Sequence[str] | None = None,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
    ) -> None:
        super().__init__()
        scopes = ["llm"] if scopes is None else list(scopes)
        if not scopes or not all(isinstance(s, str) and s and "." not in s for s in scopes):
            raise UserError(f"scopes must be a non-empty list of scope names without '.', got {scopes!r}")
        if len(set(scopes)) != len(scopes):
            raise UserError(f"scopes contains duplicates: {scopes!r}")
        if target_modules is None:
            target_modules = list(DEFAULT_TARGET_MODULES)
        if isinstance(target_modules, str):
            raise UserError(
                f"target_modules must be a list of patterns, got the string {target_modules!r}; "
                f"write [{target_modules!r}] (use 're:<regex>' for a regular expression)"
            )
        if isinstance(target_modules, Mapping):
            unknown = sorted(set(target_modules) - set(scopes))
            if unknown:
                raise UserError(
                    f"target_modules names scopes {unknown} that are not in scopes={scopes}"
                )
            targets = {s: list(target_modules.get(s, DEFAULT_TARGET_MODULES)) for s in scopes}
        else:
            targets = {s: list(target_modules) for s in scopes}
        for scope, pats in targets.items():
            if not pats:
                raise UserError(f"target_modules for scope {scope!r} is empty")
            for p in pats:
                if not isinstance(p, str) or not p:
                    raise UserError(f"invalid target pattern {p!r} for scope {scope!r}")
                if p.startswith("re:"):
                    try:
                        re.compile(p[3:])
                    except re.error as e:
                        raise UserError(f"invalid regular expression in target pattern {p!r}: {e}") from e
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise UserError(f"r must be a positive integer, got {r!r}")
        if not alpha > 0:
            raise UserError(f"alpha must be > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {dropout!r}")
        self.scopes: list[str] = scopes
        self.target_modules: dict[str, list[str]] = targets
        self.r = r
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        # Plain dicts: nn.Module does not register modules stored inside a dict, so the adapted
        # layers stay owned by the model only (no duplicate parameters / state-dict entries).
        self._scope_modules: dict[str, nn.Module] = {}
        self._injected: dict[str, nn.Module] = {}
        self._injected_by_scope: dict[str, dict[str, nn.Module]] = {}

    # ------------------------------------------------------------------ matching / injection
    @property
    def applied(self) -> bool:
        """Whether :meth:`apply` has run."""
        return bool(self._scope_modules)

    def match(self, module: nn.Module, scope: str) -> list[str]:
        """Names (relative to ``module``) of the linear modules the patterns of ``scope`` select.

        Raises ValueError when nothing matches, listing the linear modules found.
        """
        candidates = linear_module_names(module)
        pats = self.target_modules[scope]
        matched = [n for n in candidates if any(match_target(p, n) for p in pats)]
        if not matched:
            shown = candidates if len(candidates) <= 40 else candidates[:40] + [f"... ({len(candidates)} in all)"]
            raise UserError(
                f"{type(self).__name__}: no linear module in scope {scope!r} "
                f"({type(module).__name__}) matches target_modules={pats}. "
                f"Linear modules found: {shown if shown else 'none'}. Patterns match the end of a "
                f"qualified name ('q_proj' matches '...self_attn.q_proj') or a full regex written 're:<regex>'."
            )
        unused = [p for p in pats if not any(match_target(p, n) for n in matched)]
        if unused:
            warnings.warn(
                f"{type(self).__name__}: target pattern(s) {unused} match no linear module in scope {scope!r}",
                stacklevel=3,
            )
        return matched

    def apply(  # type: ignore[override]
        self, scopes: Mapping[str, nn.Module] | Callable[[nn.Module], None]
    ) -> None:
        """Inject the adapter in place into the named scope modules.

        Args:
            scopes: ``{scope_name: module}``; must contain every name of ``self.scopes`` (extra
                entries are ignored). Calling it with a function instead keeps
                ``nn.Module.apply(fn)`` working.
        """
        if callable(scopes) and not isinstance(scopes, Mapping):
            return super().apply(scopes)  # nn.Module.apply(fn) semantics, used by recursive inits
        if not isinstance(scopes, Mapping):
            raise TypeError(f"apply() expects a dict scope name -> nn.Module, got {type(scopes).__name__}")
        if self.applied:
            raise RuntimeError(f"{type(self).__name__} was already applied to scopes {list(self._scope_modules)}")
        missing = [s for s in self.scopes if s not in scopes]
        if missing:
            raise UserError(
                f"{type(self).__name__}: unknown scope(s) {missing}; scopes given: {sorted(scopes)}. "
                f"Set the adapter's `scopes` to names among the given ones."
            )
        for s in self.scopes:
            if not isinstance(scopes[s], nn.Module):
                raise TypeError(f"scope {s!r} must be an nn.Module, got {type(scopes[s]).__name__}")
        # match everything first so that an error leaves every scope untouched
        plan = {s: self.match(scopes[s], s) for s in self.scopes}
        for s in self.scopes:
            layers = self._inject(s, scopes[s], plan[s])
            self._scope_modules[s] = scopes[s]
            self._injected_by_scope[s] = dict(layers)
            for rel, layer in layers.items():
                self._injected[f"{s}.{rel}"] = layer
            for p in self._scope_adapter_parameters(s).values():
                p.requires_grad_(True)

    def _inject(self, scope: str, module: nn.Module, names: list[str]) -> dict[str, nn.Module]:
        """Adapt the modules ``names`` of ``module``; return ``{relative name: adapted layer}``.

        By default each ``nn.Linear`` is replaced by :meth:`_make_layer` of it.
        """
        return {n: self._replace(module, n, self._make_layer) for n in names}

    def _make_layer(self, base: nn.Linear) -> nn.Module:
        """The adapted layer that replaces ``base`` (adapters that replace modules implement it)."""
        raise NotImplementedError

    @staticmethod
    def _replace(module: nn.Module, name: str, factory: Callable[[nn.Linear], nn.Module]) -> nn.Module:
        """Replace submodule ``name`` of ``module`` (and every alias of the same object) by ``factory(old)``."""
        old = module.get_submodule(name)
        new = factory(old)
        aliases = [n for n, m in module.named_modules(remove_duplicate=False) if m is old and n]
        for n in aliases or [name]:
            parent_name, _, child = n.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, new)
        return new

    # ------------------------------------------------------------------ accessors
    def _require_applied(self) -> None:
        if not self.applied:
            raise RuntimeError(f"{type(self).__name__} has not been applied yet; call adapter.apply({{scope: module}})")

    def injected(self) -> dict[str, nn.Module]:
        """``"llm.model.layers.0.self_attn.q_proj"`` → adapted layer, for every adapted module."""
        return dict(self._injected)

    def _scope_adapter_parameters(self, scope: str) -> dict[str, nn.Parameter]:
        """Adapter parameters of one scope keyed ``"<scope>.<module name>.<param name>"``."""
        out: dict[str, nn.Parameter] = {}
        for rel, layer in self._injected_by_scope.get(scope, {}).items():
            if isinstance(layer, AdaptedLayer):
                for pn, p in layer.adapter_named_parameters().items():
                    out[f"{scope}.{rel}.{pn}"] = p
        return out

    def named_adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Adapter parameters keyed like :meth:`adapter_state_dict`."""
        out: dict[str, nn.Parameter] = {}
        for s in self._injected_by_scope:
            out.update(self._scope_adapter_parameters(s))
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every adapter parameter (each made ``requires_grad=True`` by :meth:`apply`)."""
        return list(self.named_adapter_parameters().values())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter-only state: ``"<scope>.<module>.<param>"`` → detached tensor (shapes as the params)."""
        return {k: p.detach() for k, p in self.named_adapter_parameters().items()}

    def load_adapter_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load an :meth:`adapter_state_dict` strictly.

        Raises ValueError on missing keys, unexpected keys or shape mismatches (nothing is loaded
        then). Values are copied in place, cast to each parameter's dtype and device.
        """
        self._require_applied()
        params = self.named_adapter_parameters()
        _check_keys(params, state, type(self).__name__)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k])

    # ------------------------------------------------------------------ task conditioning
    #: number of task ids the adapter's gate knows (None: not task-conditioned)
    num_tasks: int | None = None

    def set_task_ids(self, task_ids: torch.Tensor | None) -> None:
        """Task id of each sample of the next batch (``LongTensor [B]``).

        No-op here; task-conditioned adapters (``MoELoRA(gate="task")``) override it. The
        LightningModule may call it before every forward whatever the adapter.
        """

    # ------------------------------------------------------------------ routing / aux
    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary (router) losses of the last forward of every layer, or None."""
        total = None
        for layer in self._injected.values():
            fn = getattr(layer, "aux_loss", None)
            if fn is None:
                continue
            loss = fn()
            if loss is not None:
                total = loss if total is None else total + loss.to(total.device)
        return total

    def router_stats(self, include_entropy: bool = False) -> dict[str, torch.Tensor]:
        """Layer name → mean routing weight ``[K]`` since the last :meth:`reset_router_stats`.

        Layers that saw no token are left out. With ``include_entropy``, also
        ``"<layer>/entropy"`` → mean per-token routing entropy (nats, scalar).
        """
        out: dict[str, torch.Tensor] = {}
        for name, layer in self._injected.items():
            fn = getattr(layer, "router_mean", None)
            if fn is None:
                continue
            mean = fn()
            if mean is None:
                continue
            out[name] = mean
            if include_entropy:
                out[f"{name}/entropy"] = layer.router_entropy()
        return out

    def router_entropy(self) -> dict[str, torch.Tensor]:
        """Layer name → mean per-token routing entropy (scalar, nats) since the last reset."""
        out: dict[str, torch.Tensor] = {}
        for name, layer in self._injected.items():
            fn = getattr(layer, "router_entropy", None)
            if fn is not None and (e := fn()) is not None:
                out[name] = e
        return out

    def reset_router_stats(self) -> None:
        """Zero the accumulated router statistics of every layer."""
        for layer in self._injected.values():
            fn = getattr(layer, "reset_router_stats", None)
            if fn is not None:
                fn()

    def extra_repr(self) -> str:
        return (
            f"scopes={self.scopes}, r={self.r}, alpha={self.alpha}, dropout={self.dropout}, "
            f"layers={len(self._injected)}"
        )


def _check_keys(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], who: str) -> None:
    """Raise ValueError unless ``state`` has exactly the keys and shapes of ``expected``."""

    def _short(keys: Iterable[str]) -> str:
        keys = sorted(keys)
        return str(keys if len(keys) <= 10 else keys[:10] + [f"... ({len(keys)} in all)"])

    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    bad_shapes = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(expected[k].shape) != tuple(state[k].shape)
    ]
    if bad_shapes:
        problems.append("shape mismatches " + "; ".join(bad_shapes[:10]))
    if problems:
        raise UserError(f"{who}.load_adapter_state_dict (strict): " + "; ".join(problems))


def count_parameters(adapter: Adapter) -> dict[str, int]:
    """Number of adapter parameters per scope (``{"llm": 1234, ...}``), after :meth:`Adapter.apply`."""
    adapter._require_applied()
    return {s: sum(p.numel() for p in adapter._scope_adapter_parameters(s).values()) for s in adapter.scopes}
