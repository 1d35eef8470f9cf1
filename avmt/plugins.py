"""Plugin kinds and their registry.

Every swappable part of the system (encoder, connector, LLM, adapter, head) is a *kind*; a
YAML file picks one implementation of each kind by ``class_path``. This module names the
kinds, lists the implementations that ship with avmt (``python -m avmt plugins``), and turns an
unknown ``class_path`` into an error that lists the valid choices of that kind.
"""

from __future__ import annotations

import importlib
import inspect

from avmt.errors import UserError

# kind -> (module holding the implementations, base class name in that module)
PLUGIN_KINDS: dict[str, tuple[str, str]] = {
    "vision_encoder": ("avmt.encoders", "VisionEncoder"),
    "audio_encoder": ("avmt.encoders", "AudioEncoder"),
    "connector": ("avmt.connectors", "Connector"),
    "llm": ("avmt.llm", "CausalLM"),
    "adapter": ("avmt.adapters", "Adapter"),
    "head": ("avmt.heads", "Head"),
}

# init argument of AVModule -> plugin kind
MODULE_ARGUMENTS: dict[str, str] = {
    "vision_encoder": "vision_encoder",
    "audio_encoder": "audio_encoder",
    "vision_connector": "connector",
    "audio_connector": "connector",
    "llm": "llm",
    "adapter": "adapter",
    "image_connector": "connector",
    "heads": "head",  # a list of heads
}


def plugin_base(kind: str) -> type:
    """The base class of a plugin kind (``"connector"`` -> ``avmt.connectors.Connector``)."""
    if kind not in PLUGIN_KINDS:
        raise UserError(f"unknown plugin kind {kind!r}; kinds: {', '.join(sorted(PLUGIN_KINDS))}")
    module_name, base_name = PLUGIN_KINDS[kind]
    return getattr(importlib.import_module(module_name), base_name)


def list_plugins(kind: str) -> list[str]:
    """Importable ``class_path`` of every shipped implementation of ``kind``, sorted."""
    base = plugin_base(kind)
    module_name, _ = PLUGIN_KINDS[kind]
    module = importlib.import_module(module_name)
    found = set()
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if issubclass(obj, base) and not inspect.isabstract(obj) and (obj is not base or kind == "llm"):
            found.add(f"{module_name}.{obj.__name__}")
    return sorted(found)


def check_class_path(kind: str, class_path: str, key: str) -> None:
    """Raise a ValueError naming ``key`` and the valid choices when ``class_path`` is not a ``kind`` plugin.

    Accepts the shipped implementations and any importable subclass of the kind's base class
    (a user's own plugin).
    """
    choices = list_plugins(kind)
    if class_path in choices or class_path.rsplit(".", 1)[-1] in {c.rsplit(".", 1)[-1] for c in choices}:
        return
    module_name, _, class_name = class_path.rpartition(".")
    obj = None
    if module_name:
        try:
            obj = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            obj = None
    if isinstance(obj, type) and issubclass(obj, plugin_base(kind)):
        return
    raise UserError(
        f"{key}: unknown {kind} plugin {class_path!r}. Available {kind} plugins: {', '.join(choices)} "
        f"(or any importable subclass of {PLUGIN_KINDS[kind][0]}.{PLUGIN_KINDS[kind][1]})"
    )

