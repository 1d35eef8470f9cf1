"""Dataset converters: ``python -m avmt data convert FORMAT --src DIR --out DIR``.

Each format is one module with a :class:`~avmt.data.converters.base.Converter` subclass
registered with :func:`register_converter`; :func:`~avmt.data.converters.base.convert` writes
the shards the same way for all of them (see :mod:`avmt.data.converters.base`).

>>> from avmt.data.converters import list_converters
>>> "ave" in list_converters()
True
"""

from __future__ import annotations

from avmt.data.converters.base import (
    CONVERTED_FORMAT,
    CONVERTED_FORMAT_VERSION,
    ConvertError,
    Converter,
    LoadedClip,
    Skip,
    SourceClip,
    convert,
    safe_key,
)
from avmt.errors import UserError

__all__ = [
    "CONVERTED_FORMAT",
    "CONVERTED_FORMAT_VERSION",
    "ConvertError",
    "Converter",
    "LoadedClip",
    "Skip",
    "SourceClip",
    "convert",
    "safe_key",
    "register_converter",
    "get_converter",
    "list_converters",
]

_REGISTRY: dict[str, type[Converter]] = {}


def register_converter(cls: type[Converter]) -> type[Converter]:
    """Class decorator: make ``cls`` available as ``python -m avmt data convert {cls.name}``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"converter {cls.__name__}: name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def get_converter(name: str) -> Converter:
    """A new converter of format ``name``; ValueError listing the formats when it is unknown."""
    if name not in _REGISTRY:
        raise UserError(f"unknown dataset format {name!r}; formats: {', '.join(list_converters())}")
    return _REGISTRY[name]()


def list_converters() -> list[str]:
    """The registered format names, sorted."""
    return sorted(_REGISTRY)


# Format modules register themselves on import (after the registry exists).
from avmt.data.converters import ave, avsbench, avuie, llp, music_avqa, ref_avs  # noqa: E402,F401
