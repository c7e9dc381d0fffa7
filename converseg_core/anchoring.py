"""Request anchoring: decode an unfamiliar concept request with the nearest phrasing the model was trained on.

The decoder grounds the wordings it was trained on much better than new wordings of the same meaning, even
when the text encoder's sentence space already puts the new wording next to a trained one of the same concept
(docs/MODEL_CARD.md). A *phrasing memory* holds the training phrasings, each marked whether it is a concept
request (a function, intent, hazard, property or affordance: "something I can drink from") or names objects
(entities, spatial relations: "the mug left of the plate"). For a request that is not in the memory, the
Segmenter looks up its nearest phrasing (cosine of the mean-pooled text features, the checkpoint's own text
encoder); when that phrasing is a concept request and at least `min_cosine` close, the request is decoded with
the phrasing's text features. Requests whose nearest phrasing names objects keep their own words: a substitute
would change the names.

The memory file (JSON, gzip-compressed) lives beside the checkpoint, `<name>.phrasings.json.gz` (or
`phrasings.json.gz` in an exported folder); `training.phrasings build` writes it from the training data.
Its embeddings depend on the backend's text encoder, so they are computed once per (memory, text encoder)
and kept in a cache file (`cache_dir()`); a text encoder that answers differently gets its own.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConverSegError
from .files import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "converseg-phrasings"
VERSION = 1
SIDECAR_SUFFIX = ".phrasings.json.gz"
FOLDER_FILE = "phrasings.json.gz"
# A fixed request whose text features fingerprint a text encoder (torch, ONNX Runtime, an INT8 graph ...).
_PROBE = "Robot, can you show me something I can drink from?"

# texts -> (Q x T x D float32 token features, Q x T attention mask): a Segmenter's encode_texts.
EncodeFn = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


class PhrasingsError(ConverSegError, ValueError):
    """A phrasing memory file that cannot be used (missing, corrupt, or of another format)."""


def sidecar_path(checkpoint: str | Path) -> Path:
    """Where a checkpoint's phrasing memory lives: `converseg_edge.pt` -> `converseg_edge.phrasings.json.gz`; in an
    exported folder, `phrasings.json.gz` inside it."""
    path = Path(checkpoint)
    if path.is_dir():
        return path / FOLDER_FILE
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def cache_dir() -> Path:
    """Where computed memory embeddings are kept: $CONVERSEG_CACHE, else $XDG_CACHE_HOME/converseg, else
    ~/.cache/converseg."""
    if os.environ.get("CONVERSEG_CACHE"):
        return Path(os.environ["CONVERSEG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "converseg"


def pooled(features: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Q x T x D token features -> Q x D unit vectors: the mean over real tokens (MiniLM's sentence pooling)."""
    w = attention_mask.astype(np.float32)[..., None]
    mean = (features * w).sum(1) / np.maximum(w.sum(1), 1.0)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Phrasings:
    """The memory's content: phrasings, which of them are concept requests, and the cosine a request needs."""

    texts: tuple[str, ...]
    concept: tuple[bool, ...]
    min_cosine: float

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.concept):
            raise PhrasingsError(f"{len(self.texts)} phrasings but {len(self.concept)} concept flags")
        if not self.texts:
            raise PhrasingsError("a phrasing memory needs at least one phrasing")
        if len(set(self.texts)) != len(self.texts):
            raise PhrasingsError("a phrasing memory must not repeat a phrasing")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise PhrasingsError(f"min_cosine must lie in [-1, 1], got {self.min_cosine}")

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "min_cosine": self.min_cosine,
            "phrasings": list(self.texts),
            "concept": [int(c) for c in self.concept],
        }
        # mtime=0: the same memory always gives the same bytes (and the same cache key).
        return gzip.compress(json.dumps(doc, ensure_ascii=False, indent=0).encode("utf-8"), mtime=0)

    def save(self, path: str | Path) -> Path:
        return atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> Phrasings:
        path = Path(path)
        try:
            doc = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
        except FileNotFoundError:
            raise PhrasingsError(f"{path}: no such phrasing memory") from None
        except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PhrasingsError(
                f"{path}: not a readable phrasing memory ({exc}); rebuild it with "
                "`python -m training.phrasings build`, or run without anchoring"
            ) from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise PhrasingsError(f"{path}: not a phrasing memory (no format={FORMAT!r} field)")
        if doc.get("version") != VERSION:
            raise PhrasingsError(f"{path}: phrasing memory version {doc.get('version')} (expected {VERSION})")
        try:
            texts = tuple(str(t) for t in doc["phrasings"])
            concept = tuple(bool(c) for c in doc["concept"])
            return cls(texts, concept, float(doc["min_cosine"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PhrasingsError(f"{path}: malformed phrasing memory: {exc}") from None


@dataclass(frozen=True)
class Anchor:
    """What a request was decoded with: `text` is the request itself when no anchor applied."""

    text: str
    cosine: float  # to the nearest memory phrasing (1.0 for a phrasing of the memory)
    anchored: bool


class PhrasingMemory:
    """Phrasings with their embeddings under one text encoder; `anchor(request embedding)` picks the text to
    decode with."""

    def __init__(self, phrasings: Phrasings, embeddings: np.ndarray) -> None:
        if embeddings.shape[0] != len(phrasings.texts) or embeddings.ndim != 2:
            raise PhrasingsError(f"{embeddings.shape} embeddings for {len(phrasings.texts)} phrasings")
        self.phrasings = phrasings
        self.embeddings = embeddings.astype(np.float32)
        self._index = {t: i for i, t in enumerate(phrasings.texts)}

    @classmethod
    def build(
        cls,
        phrasings: Phrasings,
        encode: EncodeFn,
        *,
        batch_size: int = 256,
        cache: Path | None = None,
    ) -> PhrasingMemory:
        """Embed every phrasing with `encode` (texts -> token features, attention mask), or read them from
        `cache` (a folder) when this memory was embedded there by a text encoder that answers the probe
        request identically (to 4 decimals)."""
        probe_feats, probe_mask = encode([_PROBE])
        probe = pooled(probe_feats, probe_mask)[0]
        key = hashlib.sha256(
            phrasings.to_bytes() + np.round(probe, 4).astype(np.float32).tobytes()
        ).hexdigest()
        cached = cache / f"phrasings-{key[:24]}.npy" if cache is not None else None
        if cached is not None and cached.is_file():
            try:
                emb = np.load(cached, allow_pickle=False)
                if emb.shape == (len(phrasings.texts), probe.shape[0]):
                    return cls(phrasings, emb)
            except (OSError, ValueError):
                pass  # a damaged cache file is recomputed and replaced below
        log.info(
            "embedding %d phrasings for request anchoring (once; kept in %s)", len(phrasings.texts), cache
        )
        # Phrasings of similar length share a batch, so little of it is padding.
        order = sorted(range(len(phrasings.texts)), key=lambda i: len(phrasings.texts[i]))
        emb = np.zeros((len(order), probe.shape[0]), dtype=np.float16)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            feats, mask = encode([phrasings.texts[i] for i in rows])
            emb[rows] = pooled(feats, mask)
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                np.save(buf, emb, allow_pickle=False)
                atomic_write_bytes(cached, buf.getvalue())
            except OSError:
                pass  # a read-only home still anchors; it only embeds again next time
        return cls(phrasings, emb)

    def anchor(self, request: str, embedding: np.ndarray) -> Anchor:
        """request and its D-vector (pooled features) -> the text to decode it with."""
        if request in self._index:
            return Anchor(request, 1.0, False)
        # einsum's own loop, not BLAS: an OpenBLAS matrix-vector product leaves its threads spinning, and the
        # torch decoder right after it then ran twice as slow (bench/bench_anchoring.py).
        sims = np.einsum("ij,j->i", self.embeddings, embedding.astype(np.float32))
        best = int(np.argmax(sims))
        cosine = float(sims[best])
        if self.phrasings.concept[best] and cosine >= self.phrasings.min_cosine:
            return Anchor(self.phrasings.texts[best], cosine, True)
        return Anchor(request, cosine, False)


def copy_sidecar(source: str | Path, dest: str | Path) -> Path | None:
    """Give a checkpoint or exported folder made from `source` (a checkpoint or folder) the phrasing memory
    of `source`, so it anchors requests like `source` does; when `source` has none, a memory left at `dest`
    from an earlier run is removed (it would anchor with phrasings this model never trained on). Returns the
    copy's path, or None."""
    src, dst = sidecar_path(source), sidecar_path(dest)
    if not src.is_file():
        dst.unlink(missing_ok=True)
        return None
    Phrasings.load(src)  # a corrupt memory fails here, at build time, not on the robot
    return atomic_write_bytes(dst, src.read_bytes())
