"""The segment node's core without ROS: queries, newest-frame mailbox, worker, results, settings.

A real Segmenter with random weights (converseg_edge at 128 px) is injected; nothing is faked.
"""

from __future__ import annotations

import json
import math
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from converseg_ros.image_conversion import rgb_to_image_fields
from converseg_ros.model_loading import describe_load_failure, load_segmenter
from converseg_ros.params import SEGMENT_PARAMETERS, SegmentSettings
from converseg_ros.pipeline import Frame, SegmentationPipeline, label_image, overlay_image
from converseg_ros.queries import QueryCommand, QueryRejected, parse_query_message
from converseg_ros.results import result_document

torch = pytest.importorskip("torch", reason="the random-weight test model needs PyTorch")
TINY = SegmentSettings(random_model="converseg_edge", random_model_img_size=128)


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    return load_segmenter(TINY)


def frame(width=64, height=48, seq=0, write_as="rgb8", **change):
    """A frame message written in ``write_as``; ``change`` then overrides message fields (bad frames)."""
    rgb = np.random.default_rng(seq).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    header = SimpleNamespace(stamp=SimpleNamespace(sec=seq, nanosec=7), frame_id=f"cam{seq}")
    msg = SimpleNamespace(header=header, **(rgb_to_image_fields(rgb, write_as) | change))
    return Frame(msg, time.monotonic())


def make_pipeline(segmenter, **kwargs):
    problems = []
    pipe = SegmentationPipeline(segmenter=segmenter, on_problem=lambda r, m: problems.append(r), **kwargs)
    return pipe, problems


# -- query conventions ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  the red mug ", QueryCommand("set", ("the red mug",))),
        ('["a", " b "]', QueryCommand("set", ("a", "b"))),
        ("[]", QueryCommand("set", ())),
        ('{"op": "add", "queries": ["knife"]}', QueryCommand("add", ("knife",))),
        ('{"op": "remove", "queries": ["knife"]}', QueryCommand("remove", ("knife",))),
        ('{"op": "clear"}', QueryCommand("clear")),
        ('{"queries": ["x"]}', QueryCommand("set", ("x",))),
    ],
)
def test_query_conventions(text, expected):
    assert parse_query_message(text, max_chars=256) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty_query"),
        ("   \n\t ", "empty_query"),
        ("x" * 10_000, "query_too_long"),
        ("x" * 257, "query_too_long"),
        ("mug \ufffd", "query_not_utf8"),
        ("[not json", "bad_query_json"),
        ('{"op": "explode"}', "bad_query_json"),
        ('{"op": "add", "queries": "mug"}', "bad_query_json"),
        ('{"op": "add", "queries": []}', "empty_query"),
        ('["ok", "  "]', "empty_query"),
        ('{"op": "set", "queries": ["a"], "extra": 1}', "bad_query_json"),
        ("42", None),  # plain text that happens to be a number is a query
    ],
)
def test_bad_queries_are_rejected_with_a_reason(text, reason):
    if reason is None:
        assert parse_query_message(text, max_chars=256).queries == ("42",)
        return
    with pytest.raises(QueryRejected) as info:
        parse_query_message(text, max_chars=256)
    assert info.value.reason == reason


def test_query_commands_apply():
    active = QueryCommand("set", ("a", "b", "a")).apply((), max_queries=4)
    assert active == ("a", "b")
    active = QueryCommand("add", ("c", "a")).apply(active, max_queries=4)
    assert active == ("a", "b", "c")
    assert QueryCommand("remove", ("b",)).apply(active, max_queries=4) == ("a", "c")
    assert QueryCommand("clear").apply(active, max_queries=4) == ()
    with pytest.raises(QueryRejected):
        QueryCommand("add", ("d", "e")).apply(active, max_queries=4)


# -- pipeline -------------------------------------------------------------------------------------------
def test_no_query_no_work(segmenter):
    pipe, _ = make_pipeline(segmenter)
    pipe.submit(frame())
    assert pipe.step() is None
    assert pipe.stats.processed == 0


def test_a_frame_that_came_before_the_first_query_is_answered_when_it_comes(segmenter):
    # A single or latched image: no later frame will come to carry the answer.
    pipe, _ = make_pipeline(segmenter)
    pipe.submit(frame(seq=1))
    pipe.submit(frame(seq=2))
    assert pipe.step() is None and pipe.stats.processed == 0
    pipe.handle_query("the red mug")
    result = pipe.step()
    assert result is not None and result.header.frame_id == "cam2"
    assert pipe.stats.dropped == 1 and pipe.stats.processed == 1
    assert pipe.step() is None  # answered once, not again


def test_newest_frame_wins_and_drops_are_counted(segmenter):
    pipe, _ = make_pipeline(segmenter)
    pipe.handle_query("the red mug")
    for seq in range(3):
        pipe.submit(frame(seq=seq))
    result = pipe.step()
    assert result.header.frame_id == "cam2"
    assert pipe.stats.dropped == 2 and pipe.stats.processed == 1
    assert pipe.step() is None  # nothing left: no backlog


def test_result_has_camera_resolution_and_header(segmenter):
    pipe, _ = make_pipeline(segmenter)
    pipe.handle_query("the red mug")
    pipe.submit(frame(width=70, height=30, seq=5, write_as="bgra8"))
    result = pipe.step()
    assert result.labels.shape == (30, 70) and result.labels.dtype == np.uint8
    assert result.rgb.shape == (30, 70, 3)
    assert result.header.stamp.sec == 5
    assert set(result.timings) == {"queue", "convert", "model", "postprocess", "pipeline"}
    doc = json.loads(json.dumps(result_document(result, camera_to_mask_ms=12.5)))
    assert doc["width"] == 70 and doc["height"] == 30 and doc["frame_id"] == "cam5"
    assert doc["stamp"] == {"sec": 5, "nanosec": 7}
    assert doc["latency_ms"]["camera_to_mask"] == 12.5
    (entry,) = doc["queries"]
    assert entry["label"] == 1 and entry["query"] == "the red mug"
    assert set(entry) == {
        "label", "query", "present", "presence", "score", "area", "box", "truncated", "timings_ms"
    }  # fmt: skip
    assert entry["truncated"] is False
    assert entry["area"] == int((result.labels == 1).sum())


def test_switching_queries_changes_the_result_and_encodes_text_once(segmenter):
    pipe, _ = make_pipeline(segmenter)
    pipe.handle_query("the red mug")
    pipe.submit(frame())
    assert pipe.step().queries == ("the red mug",)
    encodes = segmenter.stats["queries_encoded"]
    pipe.handle_query('{"op": "add", "queries": ["the blue bowl"]}')
    pipe.submit(frame())
    result = pipe.step()
    assert result.queries == ("the red mug", "the blue bowl")
    assert int(result.labels.max()) <= 2
    pipe.submit(frame())
    pipe.step()  # same queries again: nothing re-encoded
    assert segmenter.stats["queries_encoded"] <= encodes + 1
    pipe.handle_query("the knife")
    pipe.submit(frame())
    assert pipe.step().queries == ("the knife",)
    pipe.handle_query('{"op": "clear"}')
    pipe.submit(frame())
    assert pipe.step() is None


def test_absent_target_gives_an_empty_mask(segmenter):
    pipe, _ = make_pipeline(segmenter)
    pipe.handle_query("the red mug")
    previous = segmenter.presence_threshold
    segmenter.presence_threshold = 1.01  # nothing can be present
    try:
        pipe.submit(frame())
        result = pipe.step()
    finally:
        segmenter.presence_threshold = previous
    assert not result.labels.any()
    entry = result_document(result, camera_to_mask_ms=None)["queries"][0]
    assert entry["present"] is False and entry["area"] == 0 and entry["box"] is None


def test_bad_inputs_are_counted_and_reported_once(segmenter):
    pipe, problems = make_pipeline(segmenter, max_input_side=100)
    pipe.handle_query("the red mug")
    bad = [
        frame(encoding="yuv422"),
        frame(data=b"\0" * 10),
        frame(height=0, width=0, step=0, data=b""),
        frame(width=200, height=10),
        frame(encoding="yuv422"),
    ]
    for f in bad:
        pipe.submit(f)
        assert pipe.step() is None
    for text in ["", "  ", "x" * 10_000, "bad \ufffd"]:
        assert pipe.handle_query(text) is None
    assert pipe.queries == ("the red mug",)  # rejected queries change nothing
    pipe.submit(frame())
    assert pipe.step() is not None  # still working
    rejected = pipe.stats.rejected
    assert rejected["unsupported_encoding"] == 2
    assert (
        rejected["bad_data_length"] == 1 and rejected["empty_image"] == 1 and rejected["image_too_large"] == 1
    )
    assert (
        rejected["empty_query"] == 2 and rejected["query_too_long"] == 1 and rejected["query_not_utf8"] == 1
    )
    assert sorted(problems) == sorted(set(problems)), "each reason is reported once"
    snap = pipe.snapshot()
    assert snap["rejected_total"] == 9 and snap["frames_processed"] == 1


def test_frames_the_model_refuses_are_counted(segmenter):
    pipe, problems = make_pipeline(segmenter, max_input_side=4096)
    pipe.handle_query("the red mug")
    previous = segmenter.max_input_side
    segmenter.max_input_side = 32  # the core's own limit (InputError), below the node's
    try:
        pipe.submit(frame(width=64, height=48))
        assert pipe.step() is None
    finally:
        segmenter.max_input_side = previous
    assert problems == ["model_input_rejected"]


def test_model_unavailable_is_counted_not_fatal():
    pipe, problems = make_pipeline(None, load_error="model failed to load (CheckpointError: x)")
    pipe.handle_query("the red mug")
    pipe.submit(frame())
    pipe.submit(frame())
    assert pipe.step() is None
    pipe.submit(frame())
    assert pipe.step() is None
    # Counted; not reported again (the loader already logged the failure with its reason).
    assert pipe.stats.rejected["model_unavailable"] == 2 and problems == []


def test_worker_thread_keeps_up_without_backlog(segmenter):
    pipe, _ = make_pipeline(segmenter)
    pipe.handle_query("the red mug")
    results = []
    done = threading.Event()

    def on_result(r):
        results.append(r)
        if len(results) >= 3:
            done.set()

    pipe.start(on_result)
    try:
        seq = 0
        deadline = time.monotonic() + 20
        while not done.is_set() and time.monotonic() < deadline:
            seq += 1
            pipe.submit(frame(seq=seq))
            time.sleep(1 / 200)  # far faster than the model
    finally:
        t0 = time.monotonic()
        pipe.stop()
        assert time.monotonic() - t0 < 5
    assert len(results) >= 3
    stamps = [r.header.stamp.sec for r in results]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert pipe.stats.dropped > 0
    # Each processed frame waited at most about one model interval in the mailbox.
    model_ms = max(r.timings["model"] + r.timings["postprocess"] + r.timings["convert"] for r in results)
    assert all(r.timings["queue"] <= model_ms + 50 for r in results)


def test_rate_limit(segmenter):
    pipe, _ = make_pipeline(segmenter, min_interval_s=0.3)
    pipe.handle_query("the red mug")
    t0 = time.monotonic()
    for _ in range(2):
        pipe.submit(frame())
        assert pipe.step(timeout=1.0) is not None
    assert time.monotonic() - t0 >= 0.3


def test_label_image_overlaps_go_to_the_higher_score():
    a = np.zeros((2, 3), bool)
    b = np.zeros((2, 3), bool)
    a[0, :2] = True
    b[0, 1:] = True
    np.testing.assert_array_equal(label_image([a, b], [0.2, 0.9], (2, 3)), [[1, 2, 2], [0, 0, 0]])
    np.testing.assert_array_equal(label_image([a, b], [0.9, 0.2], (2, 3)), [[1, 1, 2], [0, 0, 0]])
    np.testing.assert_array_equal(label_image([a, b], [0.5, 0.5], (2, 3)), [[1, 1, 2], [0, 0, 0]])


def test_overlay_tints_only_masked_pixels():
    rgb = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[0, 1], [2, 0]], np.uint8)
    out = overlay_image(rgb, labels, 0.5)
    assert out[0, 0].tolist() == [100, 100, 100] and out[0, 1].tolist() != [100, 100, 100]
    assert out[0, 1].tolist() != out[1, 0].tolist()


# -- settings and model loading -------------------------------------------------------------------------
def test_settings_match_the_parameter_table():
    assert list(SegmentSettings.__dataclass_fields__) == [p.name for p in SEGMENT_PARAMETERS]
    defaults = SegmentSettings()
    assert all(getattr(defaults, p.name) == p.default for p in SEGMENT_PARAMETERS)


@pytest.mark.parametrize(
    "change",
    [
        dict(backend="caffe"),
        dict(presence_threshold=1.5),
        dict(max_queries=0),
        dict(max_rate_hz=1),
        dict(mask_probability=0.0),
        dict(mask_probability=1.0),
        dict(mask_probability=1.5),
    ],  # fmt: skip
)
def test_invalid_settings_are_named(change):
    with pytest.raises(ValueError, match=next(iter(change))):
        SegmentSettings.from_values(change)


def test_the_model_keeps_its_calibrated_presence_rule_unless_a_threshold_is_given():
    # By default the node uses the threshold training.calibrate stored in the checkpoint (and its
    # predicted-IoU weight), not a fixed 0.5; a non-negative parameter overrides the threshold only.
    from converseg_core import default_checkpoint, load_checkpoint

    config = load_checkpoint(default_checkpoint()).config
    assert config.presence_threshold != 0.5  # else this test could not tell the two apart
    own = load_segmenter(SegmentSettings())
    assert own.presence_threshold == config.presence_threshold
    assert own.config.presence_score_weight == config.presence_score_weight
    assert load_segmenter(SegmentSettings(presence_threshold=0.3)).presence_threshold == 0.3


def test_the_model_keeps_its_mask_threshold_unless_a_probability_is_given(tmp_path):
    # The parameter used to replace the checkpoint's config.mask_threshold with its own default (0.0) always.
    from converseg_core import default_checkpoint, load_checkpoint
    from converseg_core.checkpoint import write_checkpoint

    checkpoint = load_checkpoint(default_checkpoint())
    checkpoint.config = checkpoint.config.replace(mask_threshold=1.5)
    path = tmp_path / "strict.pt"
    write_checkpoint(checkpoint, path)
    assert load_segmenter(SegmentSettings(model_path=str(path))).mask_threshold == 1.5
    given = load_segmenter(SegmentSettings(model_path=str(path), mask_probability=0.9))
    assert given.mask_threshold == pytest.approx(math.log(0.9 / 0.1))  # the logit: sigmoid(logit) > 0.9
    assert load_segmenter(SegmentSettings(mask_probability=0.5)).mask_threshold == pytest.approx(0.0)


def test_missing_checkpoint_fails_with_an_actionable_message(tmp_path):
    settings = SegmentSettings(model_path=str(tmp_path / "missing.pt"))
    with pytest.raises(Exception) as info:
        load_segmenter(settings)
    message = describe_load_failure(info.value, settings)
    assert "missing.pt" in message and "model_path" in message


def test_engine_for_another_gpu_is_explained():
    from converseg_core.backends.tensorrt_backend import EngineMismatchError, EngineSideFile

    side = EngineSideFile(
        config={}, tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7", precision="fp16",
        build_date="2026-01-01T00:00:00Z", engines={},
    )  # fmt: skip
    with pytest.raises(EngineMismatchError) as info:
        side.check_compatible(tensorrt_version="10.3.0", gpu_name="NVIDIA H100", compute_capability="9.0")
    message = describe_load_failure(info.value, SegmentSettings(backend="tensorrt"))
    assert "build_trt.py" in message and "Orin" in message
