"""Data engine: rendered tabletop scenes with exact masks, scene graphs, a knowledge base and prompts.

Run `python -m training.dataengine --help`. See docs/DATAENGINE.md.
"""

from .errors import AssetError, DataEngineError, KnowledgeBaseError
from .knowledge import KnowledgeBase, load_knowledge_base
from .pipeline import Engine, EngineConfig
from .prompts import FAMILIES, PromptGenerator, Request

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
