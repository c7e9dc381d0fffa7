"""The segment node's work, in pure Python: newest-frame mailbox, query state, inference worker, stats.

The ROS node only moves messages in and out of a SegmentationPipeline; everything here is tested without
ROS, with a real converseg_core.Segmenter (random weights) injected. The pipeline also holds the node's lifecycle state
(LIFECYCLE_STATES): configure loads and warms up the model, activate starts the worker, deactivate stops it,
cleanup frees the model. Inputs that arrive while it is not active are dropped and counted.
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

from converseg_core import SegmentationResult, Segmenter
from converseg_core.errors import InputError

from .image_conversion import ImageConversionError, check_image, compressed_to_rgb, image_to_rgb
from .params import SegmentSettings
from .queries import QueryRejected, RequestDeduplicator, decode_string_message, parse_query_message

# The managed-node states this pipeline can be in (the ROS lifecycle's primary states, minus finalized).
LIFECYCLE_STATES = ("unconfigured", "inactive", "active")
# This many frames in a row failing inside the model (inference_error) make /diagnostics report ERROR until
# a frame succeeds: a model that fails on every frame is broken, not unlucky.
FAILING_MODEL_FRAMES = 3

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
    labels: H x W uint8 at camera resolution; 0 = nothing, else the label of a query (``label_of``).
      Where masks overlap the query with the higher score wins; absent targets contribute no pixels.
    rgb: H x W x 3 uint8, the frame as the model saw it (often a view of the message buffer).
    results: one SegmentationResult per query, same order.
    timings: ms: queue (callback to worker start), convert, model (segmenter), postprocess, pipeline (all).
    """

    header: Any
    labels: np.ndarray
    rgb: np.ndarray
    queries: tuple[str, ...]
    results: list[SegmentationResult]
    timings: dict[str, float]
    sequence: int = 0
    label_of: tuple[int, ...] = ()  # each query's label (pixel value in ``labels``), same order as queries


@dataclass
class PipelineStats:
    received: int = 0
    processed: int = 0
    dropped: int = 0  # replaced in the mailbox by a newer frame before the worker took it
    rate_limited: int = 0  # skipped to respect max_rate_hz
    rejected: Counter = field(default_factory=Counter)  # reason -> count, frames and queries
    duplicate_requests: int = 0  # the same query message through the second subscription (not an error)
    failing_in_a_row: int = 0  # frames in a row that failed inside the model (inference_error)
    last_failure: str = ""
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=200))  # callback to result
    model_ms: deque = field(default_factory=lambda: deque(maxlen=200))
    done_times: deque = field(default_factory=lambda: deque(maxlen=200))  # monotonic, for fps


_DEFAULTS = SegmentSettings()


class SegmentationPipeline:
    """Newest-frame-wins segmentation on a worker thread.

    segmenter: the model, or None until configure() loads it, or when it failed to load (``load_error``
      says why): frames are then counted as rejected ("model_unavailable") and nothing is published.
    on_problem(reason, message): called the first time each reason occurs (the node logs it once);
      every occurrence is counted in ``stats.rejected``.
    max_input_side, max_queries, max_query_chars: as the segment node's parameters (params.SegmentSettings,
      whose defaults these are). min_interval_s: SegmentSettings.min_interval_s.
    """

    def __init__(
        self,
        *,
        segmenter: Segmenter | None,
        max_input_side: int = _DEFAULTS.max_input_side,
        max_queries: int = _DEFAULTS.max_queries,
        max_query_chars: int = _DEFAULTS.max_query_chars,
        min_interval_s: float = _DEFAULTS.min_interval_s,
        load_error: str | None = None,
        on_problem: Callable[[str, str], None] | None = None,
    ) -> None:
        self.segmenter = segmenter
        self.load_error = load_error
        self.state = "inactive" if segmenter is not None else "unconfigured"
        self.max_input_side = max_input_side
        self.max_queries = max_queries
        self.max_query_chars = max_query_chars
        self.min_interval_s = min_interval_s
        self.on_problem = on_problem or (lambda reason, message: None)
        self.stats = PipelineStats()
        self._cond = threading.Condition()
        self._pending: Frame | None = None
        self._labels: dict[str, int] = {}  # active query -> label, in order
        self._dedup = RequestDeduplicator()
        self._queries_version = 0
        self._applied_version = 0
        # A load failure is reported by whoever loaded the model, at start; frames then only count.
        self._seen_reasons: set[str] = {"model_unavailable"} if load_error else set()
        self._applied_labels: dict[str, int] = {}  # what the segmenter holds, in its order
        self._last_start = -float("inf")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def from_settings(
        cls, settings: SegmentSettings, *, on_problem: Callable[[str, str], None] | None = None
    ) -> SegmentationPipeline:
        """An unconfigured pipeline (no model yet) with the node's settings."""
        return cls(
            segmenter=None,
            max_input_side=settings.max_input_side,
            max_queries=settings.max_queries,
            max_query_chars=settings.max_query_chars,
            min_interval_s=settings.min_interval_s,
            on_problem=on_problem,
        )

    # -- inputs (called from ROS callbacks: constant time, no inference) -------------------------------
    def submit(self, frame: Frame) -> None:
        """Keep only the newest frame: a frame still waiting is dropped and counted. A raw frame whose
        fields are wrong is rejected here (constant time), so it is counted even if it would be dropped."""
        if self.state != "active":
            with self._cond:
                self.stats.received += 1
            self._reject_inactive("frame")
            return
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
        if self.state != "active":
            self._reject_inactive("query")
            return None
        try:
            command = parse_query_message(text, max_chars=self.max_query_chars)
            with self._cond:
                self._labels = command.apply_labelled(self._labels, max_queries=self.max_queries)
                self._queries_version += 1
                self._cond.notify()
                return tuple(self._labels)
        except QueryRejected as exc:
            self.reject(exc.reason, str(exc))
            return None

    def handle_request(
        self, raw: bytes, *, path: str, publisher: bytes | None = None, sequence: int | None = None
    ) -> tuple[str, ...] | None:
        """A serialized std_msgs/String from one of the query subscriptions (``path`` names it): a copy of a
        message already applied through the other subscription is skipped, then as handle_query."""
        if self.state != "active":  # not remembered: a latched request is taken when the node activates
            self._reject_inactive("query")
            return None
        with self._cond:
            first = self._dedup.first_time(raw, path=path, publisher=publisher, sequence=sequence)
            self.stats.duplicate_requests += not first
        if not first:
            return None
        try:
            text = decode_string_message(raw)
        except QueryRejected as exc:
            self.reject(exc.reason, str(exc))
            return None
        return self.handle_query(text)

    @property
    def queries(self) -> tuple[str, ...]:
        return tuple(self._labels)

    @property
    def labels(self) -> dict[str, int]:
        """Active query -> its label (pixel value in the label image)."""
        return dict(self._labels)

    def _reject_inactive(self, what: str) -> None:
        if self.load_error:  # the loader already reported why; frames and queries only count
            self.reject("model_unavailable", f"no model: {self.load_error}")
        else:
            self.reject("node_inactive", f"a {what} arrived while the node is {self.state}: dropped")

    def reject(self, reason: str, message: str) -> None:
        with self._cond:
            self.stats.rejected[reason] += 1
            first = reason not in self._seen_reasons
            self._seen_reasons.add(reason)
        if first:
            self.on_problem(reason, message)

    # -- lifecycle -----------------------------------------------------------------------------------
    def configure(
        self, load: Callable[[], Segmenter], describe: Callable[[BaseException], str]
    ) -> str | None:
        """unconfigured -> inactive: ``load()`` builds the segmenter, then one warm-up inference runs so that
        the first real frame does not pay for lazy initialisation. On failure the state stays unconfigured,
        ``load_error`` holds ``describe(exc)`` and that text is returned."""
        try:
            segmenter = load()
            warm_up(segmenter)
        except Exception as exc:
            self.load_error = describe(exc)
            self._seen_reasons.add("model_unavailable")
            return self.load_error
        with self._cond:
            self.segmenter, self.load_error, self.state = segmenter, None, "inactive"
            self._applied_labels, self._applied_version = {}, -1  # hand the queries to this segmenter
        return None

    def activate(self, on_result: Callable[[FrameResult], None] | None = None) -> None:
        """inactive -> active; with ``on_result`` a worker thread runs, otherwise call step() yourself."""
        if self.segmenter is None:
            raise RuntimeError("activate() needs a configured model")
        self.state = "active"
        if on_result is not None:
            self.start(on_result)

    def deactivate(self) -> None:
        """active -> inactive: the worker stops (an inference in progress finishes); the waiting frame is
        dropped; the active queries are kept for the next activation."""
        self.state = "inactive"
        self.stop()
        with self._cond:
            if self._pending is not None:
                self._pending = None
                self.stats.dropped += 1

    def cleanup(self) -> None:
        """inactive -> unconfigured: the model and the active queries are released, and which requests were
        applied is forgotten, so a latched request is applied again at the next activation. (After a mere
        deactivate the queries stay, and re-applying an old latched request would undo later commands.)"""
        self.deactivate()
        with self._cond:
            self.segmenter, self._labels, self.state = None, {}, "unconfigured"
            self._queries_version += 1
            self._dedup = RequestDeduplicator()

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
            if self._pending is None or not self._labels:
                self._cond.wait(timeout)
            if not self._labels:
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
            reason = "model_input_rejected" if isinstance(exc, InputError) else "inference_error"
            with self._cond:
                if reason == "inference_error":
                    self.stats.failing_in_a_row += 1
                    self.stats.last_failure = f"{type(exc).__name__}: {exc}"[:300]
            self.reject(reason, f"{type(exc).__name__}: {exc}")
            return None
        t_model = time.monotonic()
        label_of = tuple(self._applied_labels.values())  # results come in the order of the queries set
        labels = label_image([r.mask for r in results], [r.score for r in results], rgb.shape[:2], label_of)
        end = time.monotonic()
        timings = {
            "queue": (start - frame.received) * 1e3,
            "convert": (t_conv - start) * 1e3,
            "model": (t_model - t_conv) * 1e3,
            "postprocess": (end - t_model) * 1e3,
            "pipeline": (end - frame.received) * 1e3,
        }
        with self._cond:
            self.stats.failing_in_a_row = 0
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
            label_of=label_of,
        )

    def _sync_queries(self) -> bool:
        """Hand changed queries to the segmenter (which encodes each new text once)."""
        with self._cond:
            labels, version = dict(self._labels), self._queries_version
        if version != self._applied_version:
            self._applied_version = version
            if labels:
                try:
                    self.segmenter.set_queries(list(labels))
                except Exception as exc:
                    self.reject("query_rejected_by_model", f"{type(exc).__name__}: {exc}")
                    with self._cond:  # the segmenter still holds the queries applied before
                        if self._queries_version == version:
                            self._labels = dict(self._applied_labels)
                    return bool(self._applied_labels)
            self._applied_labels = labels
        return bool(labels)

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
                "active_queries": len(self._labels),
                "duplicate_requests": s.duplicate_requests,
                "lifecycle_state": self.state,
            }
        recent = [t for t in done if t > time.monotonic() - 5.0]
        out["fps"] = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 else 0.0
        out["latency_ms_median"] = statistics.median(latencies) if latencies else 0.0
        out["model_ms_median"] = statistics.median(model) if model else 0.0
        return out

    def health(self, rejected_since_last: bool) -> tuple[str, str]:
        """("OK" | "WARN" | "ERROR", message) for /diagnostics. ERROR lasts as long as its cause: a model that
        did not load, or one whose last FAILING_MODEL_FRAMES or more frames all failed (until one succeeds)."""
        if self.load_error:
            return "ERROR", self.load_error
        with self._cond:
            failing, last = self.stats.failing_in_a_row, self.stats.last_failure
        if failing >= FAILING_MODEL_FRAMES:
            return "ERROR", f"inference failing: the last {failing} frames failed in the model ({last})"
        if rejected_since_last:
            return "WARN", "rejected inputs since the last report"
        if self.state != "active":
            return "OK", f"{self.state}: not segmenting (lifecycle)"
        return "OK", "ok"


def warm_up(segmenter: Segmenter) -> None:
    """One inference on a small grey frame, so lazy set-up (allocations, kernels, graph optimisation) happens
    during configure rather than on the first camera frame. The segmenter's queries are left as they were."""
    kept = list(segmenter.queries)
    segmenter.set_image(np.full((64, 64, 3), 128, dtype=np.uint8))
    segmenter.predict(["warm-up"])
    if kept:
        segmenter.set_queries(kept)


def label_image(
    masks: list[np.ndarray], scores: list[float], shape: tuple[int, int], label_of: tuple[int, ...] = ()
) -> np.ndarray:
    """H x W uint8: 0 = background, masks[i]'s pixels = label_of[i] (default i + 1); overlaps go to the
    higher score (ties: the earlier mask)."""
    labels = np.zeros(shape, dtype=np.uint8)
    label_of = label_of or tuple(range(1, len(masks) + 1))
    # Paint low scores first so higher scores overwrite them; on ties the earlier query is painted last.
    order = sorted(range(len(masks)), key=lambda i: (scores[i], -i))
    for index in order:
        labels[masks[index]] = label_of[index]
    return labels


def overlay_image(rgb: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """H x W x 3 uint8: the frame with each query's pixels tinted in its PALETTE colour."""
    out = np.array(rgb, dtype=np.uint8, copy=True)
    hit = labels > 0
    if hit.any() and alpha > 0:
        colours = PALETTE[(labels[hit] - 1) % len(PALETTE)].astype(np.float32)
        out[hit] = (out[hit] * (1.0 - alpha) + colours * alpha).astype(np.uint8)
    return out
