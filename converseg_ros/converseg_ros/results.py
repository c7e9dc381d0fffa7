"""The JSON document published on /converseg/result (a std_msgs/String), built without ROS.

One document per processed frame (docs/ROS.md has an example):

    stamp {sec, nanosec}, frame_id     the camera frame's header, as on /converseg/mask
    sequence                           processed-frame counter of this node
    width, height                      camera resolution (= mask resolution)
    latency_ms                         queue, convert, model, postprocess, pipeline (callback to result),
                                       camera_to_mask (header stamp to publish; null if the stamp is 0)
    queries[]                          one entry per active query, in label order:
        label          value of this query's pixels in /converseg/mask; kept while the query stays active
        query          the text as the model saw it
        present        false: the model says the target is not in the picture; its mask is then empty
        presence       probability that the target is present (0..1)
        score          predicted mask quality (0..1, uncalibrated)
        area           pixels of the query's own mask (0 when absent); overlaps are not removed
        box            [x0, y0, x1, y1] inclusive pixel bounds, or null when the mask is empty
        anchor         the trained phrasing the request was decoded with (request anchoring), or null
        timings_ms     the segmenter's own stage timings for this frame
"""

from __future__ import annotations

from typing import Any

from .pipeline import FrameResult


def result_document(result: FrameResult, *, camera_to_mask_ms: float | None) -> dict[str, Any]:
    header = result.header
    height, width = result.labels.shape
    latency = {k: round(v, 3) for k, v in result.timings.items()}
    latency["camera_to_mask"] = None if camera_to_mask_ms is None else round(camera_to_mask_ms, 3)
    return {
        "stamp": {"sec": int(header.stamp.sec), "nanosec": int(header.stamp.nanosec)},
        "frame_id": str(header.frame_id),
        "sequence": result.sequence,
        "width": width,
        "height": height,
        "latency_ms": latency,
        "queries": [
            {
                "label": result.label_of[i] if result.label_of else i + 1,
                "query": r.query,
                "present": bool(r.present),
                "presence": round(float(r.presence), 4),
                "score": round(float(r.score), 4),
                "area": int(r.area),
                "box": None if r.box is None else [int(v) for v in r.box],
                "peak": None if r.peak is None else [int(v) for v in r.peak],
                "truncated": bool(r.truncated),
                "anchor": r.anchor,
                "timings_ms": {k: round(float(v), 3) for k, v in r.timings.items()},
            }
            for i, r in enumerate(result.results)
        ],
    }
