"""Data engine: rendered tabletop scenes with exact masks, scene graphs, a knowledge base and prompts.

Run `python -m training.dataengine --help`. See docs/DATAENGINE.md.
"""

from .render import configure_gl

# MuJoCo reads MUJOCO_GL when it is imported: choose EGL/OSMesa before any submodule imports mujoco.
configure_gl()

from .errors import AssetError, DataEngineError, KnowledgeBaseError  # noqa: E402
from .knowledge import KnowledgeBase, load_knowledge_base  # noqa: E402
from .pipeline import Engine, EngineConfig  # noqa: E402
from .prompts import FAMILIES, PromptGenerator, Request  # noqa: E402

__all__ = [
    "AssetError",
    "DataEngineError",
    "Engine",
    "EngineConfig",
    "FAMILIES",
    "KnowledgeBase",
    "KnowledgeBaseError",
    "PromptGenerator",
    "Request",
    "load_knowledge_base",
]
