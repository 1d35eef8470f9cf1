"""Adapter plugins injected by module-name pattern: plain LoRA (peft), MoE-LoRA, I-LoRA.

All share :class:`Adapter`'s contract: ``apply({scope: module})``, ``injected()``,
``trainable_parameters()``, ``adapter_state_dict()`` / ``load_adapter_state_dict()`` (strict),
``aux_loss()``, ``router_stats()``.
"""

from .base import DEFAULT_TARGET_MODULES, Adapter, AdaptedLayer, count_parameters, match_target
from .crab import convert_crab_state_dict
from .ilora import KERNELS, ILoRA, ILoRALinear
from .lora import LoRA
from .moe_lora import MoELoRA, MoELoRALinear
from .routing import route

__all__ = [
    "Adapter",
    "AdaptedLayer",
    "DEFAULT_TARGET_MODULES",
    "ILoRA",
    "ILoRALinear",
    "KERNELS",
    "LoRA",
    "MoELoRA",
    "MoELoRALinear",
    "convert_crab_state_dict",
    "count_parameters",
    "match_target",
    "route",
]
