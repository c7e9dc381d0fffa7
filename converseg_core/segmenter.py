"""Segmenter: the stateful predictor (SAM's set_image / predict pattern, with text queries).

`set_image` runs the image encoder and the per-frame part of the decoder (FrameContext) once per frame;
`set_query` / `set_queries` tokenize and encode each distinct request once and cache it; `predict` runs only
the per-request part of the fusion + mask decoder. This module imports
no torch: with the ONNX Runtime or TensorRT backend a robot needs numpy, tokenizers and the runtime only.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .anchoring import PhrasingMemory, Phrasings, cache_dir, pooled, sidecar_path
from .backends import Backend, get_backend
from .backends.base import FrameContext
from .config import ConverSegConfig
from .errors import ConverSegError, InputError
from .processing import (
    PreprocessedImage,
    logit_peak,
    mask_box,
    preprocess,
    presence_probability,
    upsample_logits,
    validate_image,
)

# Requests are sentences; 2,000 characters is far past any real one and well under anything that would
# stall the tokenizer. Longer text is rejected; text past max_query_tokens is truncated with a warning.
MAX_QUERY_CHARS = 2000
TEXT_CACHE_SIZE = 256


@dataclass
class SegmentationResult:
    """One answer to one request about one frame.

    mask: H x W bool at the resolution of the image given to set_image (empty when the target is absent).
    score: the decoder's predicted IoU of the mask (0..1, uncalibrated).
    presence: probability that what was asked for is in the picture at all (the presence head's, with the
        predicted IoU added at config.presence_score_weight).
    present: presence >= the presence threshold; when False the mask is empty.
    area: number of mask pixels. box: (x0, y0, x1, y1) inclusive pixel bounds of the mask, or None.
    peak: (x, y) pixel of the highest mask logit, where the model is surest the answer lies, given even when
        the target is reported absent (a point to look at or a place to start a grasp search).
    truncated: the request was longer than config.max_query_tokens; the model read only its beginning.
    anchor: the trained phrasing the request was decoded with (request anchoring, converseg_core.anchoring),
        or None when it was decoded with its own words.
    timings: milliseconds per stage of the predict() call that produced this result.
    """

    query: str
    mask: np.ndarray
    score: float
    presence: float
    present: bool
    area: int
    box: tuple[int, int, int, int] | None
    truncated: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    peak: tuple[int, int] | None = None
    anchor: str | None = None


class NoImageError(ConverSegError, RuntimeError):
    """predict() was called before set_image()."""


class ModelOutputError(ConverSegError, RuntimeError):
    """The backend returned NaN or infinite values: no answer can be trusted."""


def normalize_query(text: object) -> str:
    """Validate a request and collapse its whitespace; raise InputError naming what is wrong."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"query is not valid UTF-8 text: {exc}") from exc
    if not isinstance(text, str):
        raise InputError(f"query must be a string, got {type(text).__name__}")
    if len(text) > MAX_QUERY_CHARS:
        raise InputError(f"query is {len(text)} characters long; the limit is {MAX_QUERY_CHARS}")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise InputError("query is empty or whitespace only")
    return cleaned


class Segmenter:
    def __init__(
        self,
        model: object,
        *,
        tokenizer: object | None = None,
        mask_threshold: float | None = None,
        presence_threshold: float | None = None,
        max_input_side: int | None = None,
        phrasings: Phrasings | None = None,
    ) -> None:
        """model: a ConverSeg torch module, or any Backend (see converseg_core.backends). phrasings: a phrasing
        memory for request anchoring (converseg_core.anchoring); None decodes every request with its own words."""
        if isinstance(model, Backend):
            self.backend: Backend = model
        else:
            from .backends.torch_backend import TorchBackend

            self.backend = TorchBackend(model)  # type: ignore[arg-type]
        self.config: ConverSegConfig = self.backend.config
        if tokenizer is None:
            from .tokenizer import QueryTokenizer

            path = self.backend.tokenizer_path
            tokenizer = QueryTokenizer.from_file(path) if path else QueryTokenizer.default()
        self.tokenizer = tokenizer
        self.mask_threshold = self.config.mask_threshold if mask_threshold is None else mask_threshold
        self.presence_threshold = (
            self.config.presence_threshold if presence_threshold is None else presence_threshold
        )
        self.max_input_side = self.config.max_input_side if max_input_side is None else max_input_side
        self._image: PreprocessedImage | None = None
        self._frame: FrameContext | None = None
        self._queries: list[str] = []
        # query -> (token features T x 384, attention mask T, truncated)
        self._text_cache: OrderedDict[str, tuple[np.ndarray, np.ndarray, bool]] = OrderedDict()
        self.phrasings = phrasings
        self._anchors: dict[str, str] = {}  # request -> the trained phrasing it is decoded with
        # Embedded here, not on the first request, so a robot's first request does not wait for it.
        self._memory = (
            PhrasingMemory.build(phrasings, self.encode_texts, cache=cache_dir()) if phrasings else None
        )
        # Counters that tests and diagnostics read: expensive work must happen once.
        self.stats = {"image_encodes": 0, "text_encodes": 0, "queries_encoded": 0}
        self.last_image_ms = 0.0

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, backend: str = "torch", anchoring: bool | str | Path = True, **kwargs
    ) -> Segmenter:
        """path: a checkpoint file (torch) or an exported folder (onnxruntime, tensorrt). anchoring: True uses
        the phrasing memory beside the checkpoint when there is one (`anchoring.sidecar_path`), False never
        anchors, a path names the memory file (which must then exist)."""
        backend_options = ("device", "providers", "num_threads")
        backend_kwargs = {k: kwargs.pop(k) for k in backend_options if k in kwargs}
        if anchoring is True:
            beside = sidecar_path(path)
            kwargs.setdefault("phrasings", Phrasings.load(beside) if beside.is_file() else None)
        elif anchoring is not False:
            kwargs.setdefault("phrasings", Phrasings.load(anchoring))
        return cls(get_backend(backend, path, **backend_kwargs), **kwargs)

    # -- image ---------------------------------------------------------------------------------------
    def set_image(self, image: np.ndarray) -> None:
        """image: H x W x 3 uint8 RGB. Runs the image encoder and the decoder's per-frame part once; predict()
        reuses them."""
        image = validate_image(image, max_side=self.max_input_side)
        start = time.perf_counter()
        cfg = self.config
        pre = preprocess(image, img_size=cfg.img_size, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std)
        self._frame = self.backend.prepare_frame(pre.tensor)
        self._image = pre
        self.stats["image_encodes"] += 1
        self.last_image_ms = (time.perf_counter() - start) * 1e3

    @property
    def has_image(self) -> bool:
        return self._frame is not None

    # -- text ----------------------------------------------------------------------------------------
    def set_query(self, text: str) -> None:
        self.set_queries([text])

    def set_queries(self, texts: Sequence[str]) -> None:
        """Replace the active requests. Each distinct text is encoded once and cached."""
        if isinstance(texts, str):
            raise InputError("set_queries takes a list of strings; use set_query for one")
        queries = [normalize_query(t) for t in texts]
        if not queries:
            raise InputError("set_queries needs at least one query")
        self._encode_missing(queries)
        self._queries = queries

    @property
    def queries(self) -> list[str]:
        return list(self._queries)

    def clear_text_cache(self) -> None:
        """Forget every encoded request (and its anchor): the next predict() encodes its requests anew."""
        self._text_cache.clear()
        self._anchors.clear()

    def encode_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (Q x T x 384 token features, Q x T attention mask), without the query cache."""
        tokens = self.tokenizer.encode(list(texts), self.config.max_query_tokens)
        return self.backend.encode_text(tokens.input_ids, tokens.attention_mask), tokens.attention_mask

    def _encode_missing(self, queries: list[str]) -> None:
        missing = list(dict.fromkeys(q for q in queries if q not in self._text_cache))
        if missing:
            tokens = self.tokenizer.encode(missing, self.config.max_query_tokens)
            for query, cut in zip(missing, tokens.truncated, strict=True):
                if cut:
                    warnings.warn(
                        f"query truncated to {self.config.max_query_tokens} tokens: {query[:80]!r}...",
                        stacklevel=3,
                    )
            features = self.backend.encode_text(tokens.input_ids, tokens.attention_mask)
            self.stats["text_encodes"] += 1
            self.stats["queries_encoded"] += len(missing)
            anchors = {}
            if self._memory is not None:
                embeddings = pooled(features, tokens.attention_mask)
                for i, query in enumerate(missing):
                    found = self._memory.anchor(query, embeddings[i])
                    if found.anchored:
                        anchors[query] = found.text
            anchor_texts = list(dict.fromkeys(anchors.values()))
            if anchor_texts:
                anchor_features, anchor_mask = self.encode_texts(anchor_texts)
                self.stats["text_encodes"] += 1
                row = {t: j for j, t in enumerate(anchor_texts)}
            for i, query in enumerate(missing):
                if query in anchors:
                    j = row[anchors[query]]
                    length = int(anchor_mask[j].sum())
                    feats, mask = anchor_features[j, :length], anchor_mask[j, :length]
                    self._anchors[query] = anchors[query]
                else:
                    length = int(tokens.attention_mask[i].sum())
                    feats, mask = features[i, :length], tokens.attention_mask[i, :length]
                    self._anchors.pop(query, None)
                self._text_cache[query] = (feats.copy(), mask.copy(), bool(tokens.truncated[i]))
        for query in queries:
            self._text_cache.move_to_end(query)
        while len(self._text_cache) > max(TEXT_CACHE_SIZE, len(queries)):
            dropped, _ = self._text_cache.popitem(last=False)
            self._anchors.pop(dropped, None)

    def _stack_text(self, queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
        entries = [self._text_cache[q] for q in queries]
        longest = max(f.shape[0] for f, _, _ in entries)
        dim = entries[0][0].shape[1]
        features = np.zeros((len(entries), longest, dim), dtype=np.float32)
        mask = np.zeros((len(entries), longest), dtype=np.int64)
        for i, (f, m, _) in enumerate(entries):
            features[i, : f.shape[0]] = f
            mask[i, : m.shape[0]] = m
        return features, mask

    # -- prediction ----------------------------------------------------------------------------------
    def predict(self, queries: Sequence[str] | None = None) -> list[SegmentationResult]:
        """One result per query (the active ones from set_queries, or `queries`), in order."""
        if self._frame is None or self._image is None:
            raise NoImageError("no image: call set_image(rgb) before predict()")
        if queries is not None:
            active = [normalize_query(q) for q in queries]
            if not active:
                raise InputError("predict needs at least one query")
            self._encode_missing(active)
        else:
            active = self._queries
            if not active:
                raise InputError("no query: call set_query(text) or pass queries to predict()")
        t0 = time.perf_counter()
        features, mask = self._stack_text(active)
        low_res, iou, presence_logits = self.backend.decode(self._frame, features, mask)
        t1 = time.perf_counter()
        image = self._image
        presence = presence_probability(presence_logits, iou, self.config.presence_score_weight)
        if not (np.isfinite(presence).all() and np.isfinite(low_res).all()):
            # e.g. an FP16 engine that overflowed: an empty "absent" answer here would be silently wrong.
            raise ModelOutputError(
                f"the {self.backend.name} backend returned non-finite logits for {active!r}; "
                "an FP16 engine that overflows needs an FP32 (or INT8 with FP32 fallback) build"
            )
        results = []
        for i, query in enumerate(active):
            present = bool(presence[i] >= self.presence_threshold)
            # The presence head has the last word: an absent target never yields pixels. Logits are brought
            # to camera resolution one query at a time, and only for present targets: 64 queries on a 4096 x
            # 4096 frame would otherwise hold 4.3 GB of float32 logits at once.
            if present:
                m = (
                    upsample_logits(
                        low_res[i : i + 1],
                        img_size=self.config.img_size,
                        input_size=image.input_size,
                        original_size=image.original_size,
                    )[0]
                    > self.mask_threshold
                )
            else:
                m = np.zeros(image.original_size, dtype=bool)
            results.append(
                SegmentationResult(
                    query=query,
                    mask=m,
                    score=float(iou.reshape(len(active), -1)[i, 0]),
                    presence=float(presence[i]),
                    present=present,
                    area=int(m.sum()),
                    box=mask_box(m),
                    truncated=self._text_cache[query][2],
                    anchor=self._anchors.get(query),
                    peak=logit_peak(
                        low_res[i],
                        img_size=self.config.img_size,
                        input_size=image.input_size,
                        original_size=image.original_size,
                    ),
                )
            )
        t2 = time.perf_counter()
        timings = {
            "image_ms": self.last_image_ms,
            "decode_ms": (t1 - t0) * 1e3,
            "postprocess_ms": (t2 - t1) * 1e3,
        }
        for r in results:
            r.timings = dict(timings)
        return results

    def segment(self, image: np.ndarray, text: str) -> SegmentationResult:
        """One-shot: encode `image`, answer `text`. Leaves the image set for further predict() calls."""
        self.set_image(image)
        return self.predict([text])[0]
