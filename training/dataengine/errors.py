"""Errors the data engine raises on purpose. Each message names the file, model or category at fault."""

from converseg_core.errors import ConverSegError


class DataEngineError(ConverSegError):
    """Base class of the data engine's own errors."""


class AssetError(DataEngineError):
    """A furniture library, model or mesh that is missing or unusable; raised at start-up, never mid-run."""


class KnowledgeBaseError(DataEngineError):
    """The knowledge base or the asset catalog disagree (unknown category, missing field)."""
