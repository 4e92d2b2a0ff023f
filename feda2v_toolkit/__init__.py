"""feda2v-tk: trusted configs, working generators and an open plugin ecosystem for FedA2V.

Importing the package is cheap: torch is only imported by the parts that train or sample.
The notebook API (``train``, ``load_model``, data readers and writers) is reached through
lazy attributes so that ``import feda2v_toolkit`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Version of the plugin API (hooks, specs and base classes). Plugins may require a minimum.
API_VERSION = 1

# Public names -> "module:attribute"; resolved on first access (PEP 562).
_LAZY: dict[str, str] = {
    "hookimpl": "feda2v_toolkit.hookspecs:hookimpl",
    "load_config": "feda2v_toolkit.config:load_config",
    "train": "feda2v_toolkit.training.pipeline:train",
    "load_model": "feda2v_toolkit.model:load_model",
    "save_model": "feda2v_toolkit.model:save_model",
    "generate": "feda2v_toolkit.model.generate:generate",
    "open_dataset": "feda2v_toolkit.data:open_dataset",
    "write_dataset": "feda2v_toolkit.data:write_dataset",
    "make_demo_dataset": "feda2v_toolkit.data.demo:make_demo_dataset",
    "embed_audio": "feda2v_toolkit.audio.embed:embed",  # not "embed": that is the module's name
    "get_registry": "feda2v_toolkit.plugins:get_registry",
    "list_generators": "feda2v_toolkit.plugins:list_generators",
    "list_reducers": "feda2v_toolkit.plugins:list_reducers",
    "list_upsamplers": "feda2v_toolkit.plugins:list_upsamplers",
    "create_generator": "feda2v_toolkit.plugins:create_generator",
    "create_reducer": "feda2v_toolkit.plugins:create_reducer",
    "create_upsampler": "feda2v_toolkit.plugins:create_upsampler",
}

__all__ = ["API_VERSION", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'feda2v_toolkit' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
