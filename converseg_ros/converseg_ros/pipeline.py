"""The segment node's work, in pure Python: newest-frame mailbox, query state, inference worker, stats.

The ROS node only moves messages in and out of a SegmentationPipeline; everything here is tested without
ROS, with a real Segmenter (random weights) injected.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .image_conversion import ImageConversionError, check_image, compressed_to_rgb, image_to_rgb
from .queries import QueryRejected, parse_query_message

# Overlay colours per query index (RViz shows rgb8 directly).
PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [145, 30, 180], [70, 240, 240],
     [245, 130, 48], [240, 50, 230]],
    dtype=np.uint8,
)  # fmt: skip


@dataclass
class Frame:
    """A camera message waiting for the worker. ``msg`` is a sensor_msgs Image or CompressedImage (or any
    object with their fields); ``received`` is time.monotonic() when the callback saw it."""

    msg: Any
    received: float
    compressed: bool = False


@dataclass
class FrameResult:
    """What one processed frame produced.

    header: the camera message's header, passed through untouched.
    labels: H x W uint8 at camera resolution; 0 = nothing, k = the k-th query (1-based) of ``queries``.
      Where masks overlap the query with the higher score wins; absent targets contribute no pixels.
    rgb: H x W x 3 uint8, the frame as the model saw it (often a view of the message buffer).
    results: one converseg_core.SegmentationResult per query, same order.
    timings: ms: queue (callback to worker start), convert, model (segmenter), postprocess, pipeline (all).
    """

    header: Any
    labels: np.ndarray
    rgb: np.ndarray
    queries: tuple[str, ...]
    results: list[Any]
    timings: dict[str, float]
    sequence: int = 0


@dataclass
class PipelineStats:
    received: int = 0
    processed: int = 0
    dropped: int = 0  # replaced in the mailbox by a newer frame before the worker took it
    rate_limited: int = 0  # skipped to respect max_rate_hz
    rejected: Counter = field(default_factory=Counter)  # reason -> count, frames and queries
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=200))  # callback to result
    model_ms: deque = field(default_factory=lambda: deque(maxlen=200))
    done_times: deque = field(default_factory=lambda: deque(maxlen=200))  # monotonic, for fps


class SegmentationPipeline:
    """Newest-frame-wins segmentation on a worker thread.

    segmenter: a converseg_core.Segmenter, or None when the model failed to load (``load_error`` says why):
      frames are then counted as rejected ("model_unavailable") and nothing is published.
    on_problem(reason, message): called the first time each reason occurs (the node logs it once);
      every occurrence is counted in ``stats.rejected``.
    min_interval_s: 1 / max_rate_hz, or 0 for as fast as the model runs.
    """

    def __init__(
        self,
        *,
        segmenter: Any | None,
        max_input_side: int = 4096,
        max_queries: int = 8,
        max_query_chars: int = 256,
        min_interval_s: float = 0.0,
        load_error: str | None = None,
        on_problem: Callable[[str, str], None] | None = None,
    ) -> None:
        self.segmenter = segmenter
        self.load_error = load_error
        self.max_input_side = max_input_side
        self.max_queries = max_queries
        self.max_query_chars = max_query_chars
        self.min_interval_s = min_interval_s
        self.on_problem = on_problem or (lambda reason, message: None)
        self.stats = PipelineStats()
        self._cond = threading.Condition()
        self._pending: Frame | None = None
        self._queries: tuple[str, ...] = ()
        self._queries_version = 0
        self._applied_version = 0
        # A load failure is reported by whoever loaded the model, at start; frames then only count.
        self._seen_reasons: set[str] = {"model_unavailable"} if load_error else set()
        self._last_start = -float("inf")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- inputs (called from ROS callbacks: constant time, no inference) -------------------------------
    def submit(self, frame: Frame) -> None:
        """Keep only the newest frame: a frame still waiting is dropped and counted. A raw frame whose
        fields are wrong is rejected here (constant time), so it is counted even if it would be dropped."""
        if not frame.compressed:
            try:
                check_image(frame.msg, max_side=self.max_input_side)
            except ImageConversionError as exc:
                with self._cond:
                    self.stats.received += 1
                self.reject(exc.reason, str(exc))
                return
        with self._cond:
            self.stats.received += 1
            if self._pending is not None:
                self.stats.dropped += 1
            self._pending = frame
            self._cond.notify()

    def handle_query(self, text: str) -> tuple[str, ...] | None:
        """Apply a /converseg/query message; returns the new active queries, or None if it was rejected.
        The text is encoded by the worker before the next frame, once per distinct query."""
        try:
            command = parse_query_message(text, max_chars=self.max_query_chars)
            with self._cond:
                self._queries = command.apply(self._queries, max_queries=self.max_queries)
                self._queries_version += 1
                self._cond.notify()
                return self._queries
        except QueryRejected as exc:
            self.reject(exc.reason, str(exc))
            return None

    @property
    def queries(self) -> tuple[str, ...]:
        return self._queries

    def reject(self, reason: str, message: str) -> None:
        with self._cond:
            self.stats.rejected[reason] += 1
            first = reason not in self._seen_reasons
            self._seen_reasons.add(reason)
        if first:
            self.on_problem(reason, message)

    # -- worker --------------------------------------------------------------------------------------
    def start(self, on_result: Callable[[FrameResult], None]) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(on_result,), name="converseg-worker", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker; an inference in progress finishes first (bounded by ``timeout``)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self, on_result: Callable[[FrameResult], None]) -> None:
        while not self._stop.is_set():
            result = self.step(timeout=0.5)
            if result is not None and not self._stop.is_set():
                try:
                    on_result(result)
                except Exception as exc:  # a publisher failing at shutdown must not kill the worker loop
                    self.reject("publish_error", f"publishing a result failed: {exc!r}")

    def _take(self, timeout: float) -> Frame | None:
        """The newest frame, once there is a query for it. Until the first query arrives the newest frame
        stays in the mailbox (newer ones replace it, counted as dropped), so a single or latched image is
        answered when the request comes."""
        with self._cond:
            if self._pending is None or not self._queries:
                self._cond.wait(timeout)
            if not self._queries:
                return None
            frame, self._pending = self._pending, None
            return frame

    def step(self, timeout: float = 0.0) -> FrameResult | None:
        """Take the newest frame (waiting up to ``timeout`` s) and segment it. None when there was no
        frame, no query, no model, or the frame was rejected."""
        wait = self._last_start + self.min_interval_s - time.monotonic()
        if wait > 0:
            # Rate limit: sleep, then take whatever is newest; frames replaced meanwhile count as dropped.
            self._stop.wait(wait)
        frame = self._take(timeout)
        if frame is None:
            return None
        start = time.monotonic()
        if self.segmenter is None:
            self.reject("model_unavailable", f"no model: {self.load_error}")
            return None
        if not self._sync_queries():
            return None  # no active query: nothing to do for this frame
        self._last_start = start
        try:
            rgb = self._convert(frame)
        except ImageConversionError as exc:
            self.reject(exc.reason, str(exc))
            return None
        t_conv = time.monotonic()
        try:
            self.segmenter.set_image(rgb)
            results = self.segmenter.predict()
        except Exception as exc:
            # InputError for frames the model refuses; anything else is a backend failure (e.g. a TensorRT
            # engine built for another GPU). Either way the node stays up and counts it.
            reason = "model_input_rejected" if _is_input_error(exc) else "inference_error"
            self.reject(reason, f"{type(exc).__name__}: {exc}")
            return None
        t_model = time.monotonic()
        labels = label_image([r.mask for r in results], [r.score for r in results], rgb.shape[:2])
        end = time.monotonic()
        timings = {
            "queue": (start - frame.received) * 1e3,
            "convert": (t_conv - start) * 1e3,
            "model": (t_model - t_conv) * 1e3,
            "postprocess": (end - t_model) * 1e3,
            "pipeline": (end - frame.received) * 1e3,
        }
        with self._cond:
            self.stats.processed += 1
            self.stats.latencies_ms.append(timings["pipeline"])
            self.stats.model_ms.append(timings["model"])
            self.stats.done_times.append(end)
            sequence = self.stats.processed
        return FrameResult(
            header=getattr(frame.msg, "header", None),
            labels=labels,
            rgb=rgb,
            queries=tuple(r.query for r in results),
            results=results,
            timings=timings,
            sequence=sequence,
        )

    def _sync_queries(self) -> bool:
        """Hand changed queries to the segmenter (which encodes each new text once)."""
        with self._cond:
            queries, version = self._queries, self._queries_version
        if version != self._applied_version:
            self._applied_version = version
            if queries:
                try:
                    self.segmenter.set_queries(list(queries))
                except Exception as exc:
                    self.reject("query_rejected_by_model", f"{type(exc).__name__}: {exc}")
                    with self._cond:  # keep what the segmenter still holds
                        if self._queries_version == version:
                            self._queries = tuple(self.segmenter.queries)
                    return bool(self.segmenter.queries)
        return bool(queries)

    def _convert(self, frame: Frame) -> np.ndarray:
        if frame.compressed:
            return compressed_to_rgb(frame.msg, max_side=self.max_input_side)
        return image_to_rgb(frame.msg, max_side=self.max_input_side)

    # -- diagnostics ---------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Counters and recent medians for /diagnostics."""
        with self._cond:
            s = self.stats
            done = list(s.done_times)
            latencies = list(s.latencies_ms)
            model = list(s.model_ms)
            out = {
                "frames_received": s.received,
                "frames_processed": s.processed,
                "frames_dropped": s.dropped,
                "rejected_total": sum(s.rejected.values()),
                "rejected": dict(s.rejected),
                "active_queries": len(self._queries),
            }
        recent = [t for t in done if t > time.monotonic() - 5.0]
        out["fps"] = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 else 0.0
        out["latency_ms_median"] = statistics.median(latencies) if latencies else 0.0
        out["model_ms_median"] = statistics.median(model) if model else 0.0
        return out


def _is_input_error(exc: Exception) -> bool:
    try:
        from converseg_core.errors import InputError
    except ImportError:
        return isinstance(exc, ValueError)
    return isinstance(exc, InputError)


def label_image(masks: list[np.ndarray], scores: list[float], shape: tuple[int, int]) -> np.ndarray:
    """H x W uint8: 0 = background, k = masks[k-1]; overlaps go to the higher score (ties: the earlier)."""
    labels = np.zeros(shape, dtype=np.uint8)
    # Paint low scores first so higher scores overwrite them; on ties the earlier query is painted last.
    order = sorted(range(len(masks)), key=lambda i: (scores[i], -i))
    for index in order:
        labels[masks[index]] = index + 1
    return labels


def overlay_image(rgb: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """H x W x 3 uint8: the frame with each query's pixels tinted in its PALETTE colour."""
    out = np.array(rgb, dtype=np.uint8, copy=True)
    hit = labels > 0
    if hit.any() and alpha > 0:
        colours = PALETTE[(labels[hit] - 1) % len(PALETTE)].astype(np.float32)
        out[hit] = (out[hit] * (1.0 - alpha) + colours * alpha).astype(np.uint8)
    return out
