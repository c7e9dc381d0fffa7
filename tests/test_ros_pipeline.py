"""The segment node's core without ROS: queries, newest-frame mailbox, worker, results, settings.

A real Segmenter with random weights (converseg_edge at 128 px) is injected; nothing is faked.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from converseg_ros.image_conversion import rgb_to_image_fields
from converseg_ros.model_loading import describe_load_failure, load_failure_hint, load_segmenter
from converseg_ros.params import SEGMENT_PARAMETERS, SegmentSettings
from converseg_ros.pipeline import (
    FAILING_MODEL_FRAMES,
    Frame,
    SegmentationPipeline,
    label_image,
    overlay_image,
)
from converseg_ros.queries import (
    QueryCommand,
    QueryRejected,
    RequestDeduplicator,
    decode_string_message,
    parse_query_message,
)
from converseg_ros.results import result_document

from converseg_core.backends.tensorrt_backend import EngineMismatchError
from converseg_core.errors import BackendUnavailableError, CheckpointError

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
    if segmenter is not None:
        pipe.activate()  # no worker thread: the tests call step() themselves
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
        ("{}", "bad_query_json"),  # not a silent "clear every request"
        ('{"op": "set"}', "bad_query_json"),
        ("ok\x00\xff", "query_control_character"),
        ('["ok\\u0000"]', "query_control_character"),
        ('["mug \\ud800"]', "query_not_utf8"),  # a lone surrogate passes json.loads, not a tokenizer
        ("mug\x07bell", "query_control_character"),
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
        "label", "query", "present", "presence", "score", "area", "box", "peak", "truncated", "anchor",
        "timings_ms",
    }  # fmt: skip
    assert entry["truncated"] is False
    assert entry["anchor"] is None  # a random model has no phrasing memory
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
    # Each frame and request counted on arrival; not reported again (the loader logged the failure).
    assert pipe.stats.rejected["model_unavailable"] == 4 and problems == []
    assert pipe.health(rejected_since_last=True)[0] == "ERROR"


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
def test_settings_and_the_pipeline_take_their_defaults_from_the_parameter_table():
    defaults = SegmentSettings()
    assert [p.name for p in SEGMENT_PARAMETERS] == [f.name for f in dataclasses.fields(SegmentSettings)]
    assert all(getattr(defaults, p.name) == p.default for p in SEGMENT_PARAMETERS)
    signature = inspect.signature(SegmentationPipeline)
    for name in ("max_input_side", "max_queries", "max_query_chars", "min_interval_s"):
        assert signature.parameters[name].default == getattr(defaults, name), name
    pipe = SegmentationPipeline.from_settings(SegmentSettings(max_queries=3, max_rate_hz=4.0))
    assert (pipe.max_queries, pipe.min_interval_s, pipe.state) == (3, 0.25, "unconfigured")


def test_unknown_settings_are_named():
    with pytest.raises(ValueError, match=r"unknown parameters \['max_rate'\] for converseg_segment"):
        SegmentSettings.from_values({"max_rate": 5.0, "backend": "torch"})


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


@pytest.mark.parametrize(
    ("error", "backend", "hint"),
    [
        (EngineMismatchError("built for Orin"), "tensorrt", "rebuild them on this device"),
        (CheckpointError("engines.json not found"), "tensorrt", "model_path:= to a folder of engines built"),
        (CheckpointError("manifest.json not found"), "onnxruntime", "export/export_onnx.py"),
        (CheckpointError("not a ConverSeg checkpoint"), "torch", "model_path:= to a checkpoint (.pt)"),
        (BackendUnavailableError("no onnxruntime"), "onnxruntime", "install the runtime for backend:=onnxruntime"),
        (FileNotFoundError("model.pt"), "torch", "check model_path and that this user can read it"),
        # The type decides, not the words: a RuntimeError that mentions engines and GPUs is no EngineMismatchError.
        (RuntimeError("TensorRT engine for this GPU: out of memory"), "tensorrt", "check model_path and backend"),
    ],
)  # fmt: skip
def test_load_failures_are_explained_by_exception_type(error, backend, hint):
    settings = SegmentSettings(backend=backend)
    assert hint in load_failure_hint(error, settings)
    assert describe_load_failure(error, settings) == (
        f"model failed to load ({type(error).__name__}: {error}); {load_failure_hint(error, settings)}"
    )


def test_an_unknown_random_model_is_explained():
    settings = SegmentSettings(random_model="converseg_nope")
    with pytest.raises(KeyError) as info:
        load_segmenter(settings)
    assert "random_model:= to a registered variant" in describe_load_failure(info.value, settings)


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


# -- labels, request bytes, duplicates ------------------------------------------------------------------
def test_a_query_keeps_its_label_while_it_stays_active():
    labels = QueryCommand("set", ("a", "b", "c")).apply_labelled({}, max_queries=8)
    assert labels == {"a": 1, "b": 2, "c": 3}
    labels = QueryCommand("remove", ("a",)).apply_labelled(labels, max_queries=8)
    assert labels == {"b": 2, "c": 3}  # b and c keep their pixel values
    labels = QueryCommand("add", ("d", "b")).apply_labelled(labels, max_queries=8)
    assert labels == {"b": 2, "c": 3, "d": 1}  # the smallest free label
    assert QueryCommand("set", ("c", "e")).apply_labelled(labels, max_queries=8) == {"c": 1, "e": 2}


def test_label_image_uses_the_stable_labels(segmenter):
    pipe, _ = make_pipeline(segmenter)
    pipe.handle_query('["the red mug", "the blue bowl"]')
    pipe.submit(frame(seq=1))
    first = pipe.step()
    pipe.handle_query('{"op": "remove", "queries": ["the red mug"]}')
    pipe.submit(frame(seq=1))
    second = pipe.step()
    assert first.label_of == (1, 2) and second.label_of == (2,)
    doc = result_document(second, camera_to_mask_ms=None)
    assert [(q["query"], q["label"]) for q in doc["queries"]] == [("the blue bowl", 2)]
    # The bowl's pixels keep value 2 in the label image, whatever happened to the mug.
    mask = second.results[0].mask
    assert set(np.unique(second.labels[mask]).tolist()) <= {2}
    assert not np.isin(second.labels, [1]).any()


def _cdr(payload: bytes, little: bool = True) -> bytes:
    body = payload + b"\x00"
    return (
        (b"\x00\x01\x00\x00" if little else b"\x00\x00\x00\x00")
        + len(body).to_bytes(4, "little" if little else "big")
        + body
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (_cdr(b"the red mug"), "the red mug"),
        (_cdr("tasse à café".encode(), little=False), "tasse à café"),
        (_cdr(b"ok\x00\xff"), "query_control_character"),  # typed rclpy would read "ok"
        (_cdr(b"mug \xff\xfe"), "query_not_utf8"),
        (b"\x00\x01\x00\x00\xff\xff\x00\x00abc", "bad_query_json"),  # length past the end
        (b"\x07", "bad_query_json"),
    ],
)
def test_serialized_requests_are_decoded_or_refused_with_a_reason(raw, expected):
    try:
        assert decode_string_message(raw) == expected
    except QueryRejected as exc:
        assert exc.reason == expected


def test_a_request_arriving_through_both_subscriptions_is_applied_once():
    dedup = RequestDeduplicator()
    gid = b"publisher-1"
    assert dedup.first_time(b"a", path="volatile", publisher=gid, sequence=1)
    assert not dedup.first_time(b"a", path="latched", publisher=gid, sequence=1)
    assert dedup.first_time(b"b", path="latched", publisher=gid, sequence=2)
    assert not dedup.first_time(b"b", path="volatile", publisher=gid, sequence=2)
    assert dedup.first_time(b"a", path="volatile", publisher=b"publisher-2", sequence=1)
    # Without publisher information (Humble): the same bytes through the other path within the window.
    assert dedup.first_time(b"x", path="volatile", now=10.0)
    assert not dedup.first_time(b"x", path="latched", now=10.5)
    assert dedup.first_time(b"x", path="latched", now=20.0)


def test_pipeline_skips_duplicates_and_applies_each_command_once(segmenter):
    pipe, _ = make_pipeline(segmenter)
    add = _cdr(b'{"op": "add", "queries": ["the knife"]}')
    pipe.handle_request(_cdr(b"the red mug"), path="volatile", publisher=b"p", sequence=1)
    pipe.handle_request(add, path="volatile", publisher=b"p", sequence=2)
    # The latched subscription delivers the same two late: applying "set" again would drop the knife.
    pipe.handle_request(_cdr(b"the red mug"), path="latched", publisher=b"p", sequence=1)
    pipe.handle_request(add, path="latched", publisher=b"p", sequence=2)
    assert pipe.queries == ("the red mug", "the knife")
    assert pipe.snapshot()["duplicate_requests"] == 2


# -- lifecycle and health --------------------------------------------------------------------------------
def test_lifecycle_transitions_gate_inputs_and_free_the_model(segmenter):
    problems = []
    pipe = SegmentationPipeline(segmenter=None, on_problem=lambda r, m: problems.append(r))
    assert pipe.state == "unconfigured"
    pipe.submit(frame())
    assert pipe.handle_query("the red mug") is None
    assert pipe.stats.rejected["node_inactive"] == 2 and problems == ["node_inactive"]
    assert pipe.configure(lambda: segmenter, str) is None and pipe.state == "inactive"
    pipe.activate()
    assert pipe.handle_query("the red mug") == ("the red mug",)
    pipe.submit(frame(seq=3))
    assert pipe.step().header.frame_id == "cam3"
    pipe.deactivate()
    assert pipe.state == "inactive"
    pipe.submit(frame(seq=4))
    assert pipe.handle_query("the knife") is None
    assert pipe.stats.rejected["node_inactive"] == 4
    pipe.activate()
    pipe.submit(frame(seq=5))
    assert pipe.step().queries == ("the red mug",)  # the queries survive a deactivation
    pipe.deactivate()
    pipe.cleanup()
    assert pipe.state == "unconfigured" and pipe.segmenter is None and pipe.queries == ()
    with pytest.raises(RuntimeError):
        pipe.activate()


def test_a_failed_configure_stays_unconfigured_and_says_why():
    pipe = SegmentationPipeline(segmenter=None)

    def missing():
        raise FileNotFoundError("/models/missing.pt")

    error = pipe.configure(missing, lambda exc: f"model failed to load ({exc})")
    assert error == "model failed to load (/models/missing.pt)" and pipe.state == "unconfigured"
    assert pipe.health(rejected_since_last=False) == ("ERROR", error)
    pipe.submit(frame())
    assert pipe.stats.rejected["model_unavailable"] == 1


def test_configure_warms_the_model_up(segmenter):
    pipe = SegmentationPipeline(segmenter=None)
    before = segmenter.stats["image_encodes"]
    assert pipe.configure(lambda: segmenter, str) is None
    assert segmenter.stats["image_encodes"] == before + 1


class _Broken:
    """A model whose every frame fails inside the backend (an export that loads but cannot run)."""

    presence_threshold = 0.5
    queries: list = []

    def set_queries(self, texts):
        self.queries = list(texts)

    def set_image(self, rgb):
        raise RuntimeError("ONNXRuntimeError: node Conv_3 failed")


def test_a_model_failing_on_every_frame_stays_error_when_frames_pause():
    pipe, _ = make_pipeline(_Broken())
    pipe.handle_query("the red mug")
    for seq in range(FAILING_MODEL_FRAMES):
        pipe.submit(frame(seq=seq))
        assert pipe.step() is None
    level, message = pipe.health(rejected_since_last=False)  # no new rejections: frames paused
    assert level == "ERROR" and "ONNXRuntimeError" in message
    assert pipe.health(rejected_since_last=False)[0] == "ERROR"  # and it stays ERROR


def test_a_frame_that_succeeds_clears_the_failing_model_error(segmenter):
    pipe, _ = make_pipeline(segmenter)
    pipe.handle_query("the red mug")
    real = pipe.segmenter
    pipe.segmenter = _Broken()
    pipe._applied_version = -1
    for seq in range(FAILING_MODEL_FRAMES):
        pipe.submit(frame(seq=seq))
        pipe.step()
    assert pipe.health(rejected_since_last=False)[0] == "ERROR"
    pipe.segmenter = real
    pipe._applied_version = -1
    pipe.submit(frame(seq=9))
    assert pipe.step() is not None
    assert pipe.health(rejected_since_last=False) == ("OK", "ok")


def test_a_latched_request_is_applied_again_only_after_cleanup(segmenter):
    pipe, _ = make_pipeline(segmenter)
    latched = _cdr(b"the red mug")
    pipe.handle_request(latched, path="latched", publisher=b"p1", sequence=1)
    pipe.handle_request(
        _cdr(b'{"op": "add", "queries": ["the knife"]}'), path="volatile", publisher=b"p2", sequence=1
    )
    pipe.deactivate()
    pipe.activate()
    # The latched subscription is created again on activate and delivers the old request: after a mere
    # deactivation applying it would undo the later "add".
    pipe.handle_request(latched, path="latched", publisher=b"p1", sequence=1)
    assert pipe.queries == ("the red mug", "the knife")
    pipe.deactivate()
    pipe.cleanup()
    assert pipe.configure(lambda: segmenter, str) is None
    pipe.activate()
    pipe.handle_request(latched, path="latched", publisher=b"p1", sequence=1)
    assert pipe.queries == ("the red mug",)


def test_cleanup_lets_the_model_be_freed():
    import gc
    import weakref

    torch.manual_seed(0)
    pipe = SegmentationPipeline(segmenter=None)
    assert pipe.configure(lambda: load_segmenter(TINY), str) is None
    model = weakref.ref(pipe.segmenter)
    pipe.activate()
    pipe.handle_query("the red mug")
    pipe.submit(frame())
    assert pipe.step() is not None
    pipe.deactivate()
    pipe.cleanup()
    gc.collect()
    assert model() is None, "something still holds the segmenter after cleanup"
