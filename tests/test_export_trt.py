"""TensorRT side of export/: what runs without TensorRT is tested here; what needs it is marked and skipped.

Covered without TensorRT: build_trt.py's exit and message when TensorRT is missing, argument parsing of
--profile, optimization-profile shapes from a manifest, the side-file round trip and its refusal of engines
from another TensorRT or GPU, and the numpy half of the INT8 calibrator (batching, cache file).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from converseg_core.artifacts import (
    QUERIES_AXIS,
    SIDE_FILE_NAME,
    STAGES,
    TOKENS_AXIS,
    EngineMismatchError,
    EngineSideFile,
    GraphSpec,
    OnnxManifest,
    TensorSpec,
    frame_io_problem,
    graph_specs,
)
from converseg_core.backends.tensorrt_backend import TensorRTBackend, query_limits
from converseg_core.errors import BackendUnavailableError, CheckpointError
from converseg_core.files import sha256_file
from converseg_core.registry import get_config, list_models
from converseg_export.build_trt import EXIT_NO_TENSORRT, build_parser, input_profiles, parse_profile
from converseg_export.calibration import CalibrationBatcher, find_images, read_cache, write_cache

REPO = Path(__file__).resolve().parents[1]
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(
    not HAS_TENSORRT,
    reason="TensorRT is not installed (runs on a Jetson with JetPack 6 or in an NGC container)",
)


def side_file(**changes) -> EngineSideFile:
    base = EngineSideFile(
        config=get_config("converseg_edge").to_dict(),
        tensorrt_version="10.3.0.30",
        gpu_name="Orin",
        compute_capability="8.7",
        precision="fp16",
        build_date="2026-11-21T21:00:00+00:00",
        engines={s: {"file": f"{s}.engine", "sha256": "0" * 64, "precision": "fp16"} for s in STAGES},
    )
    return replace(base, **changes)


# --- build_trt.py without TensorRT ------------------------------------------------------------------------


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message given where TensorRT is missing")
def test_build_trt_without_tensorrt_exits_non_zero_and_says_where_it_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "export" / "build_trt.py"),
            "--onnx-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "e"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == EXIT_NO_TENSORRT, proc.stderr
    assert "TensorRT is not installed" in proc.stderr
    assert "JetPack" in proc.stderr and "NGC" in proc.stderr
    assert not (tmp_path / "e").exists()


def test_build_trt_int8_without_calibration_data_is_refused_before_anything_else(tmp_path, capsys):
    from converseg_export.build_trt import main

    code = main(["--onnx-dir", str(tmp_path), "--out", str(tmp_path / "e"), "--precision", "int8"])
    assert code == 2
    assert "--calib-images" in capsys.readouterr().err


def test_precision_is_a_choice():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--onnx-dir", "a", "--out", "b", "--precision", "bf16"])


@pytest.mark.parametrize(
    "text, expected",
    [("num_tokens=1,16,32", ("num_tokens", (1, 16, 32))), ("num_queries=1,2,4", ("num_queries", (1, 2, 4)))],
)
def test_parse_profile(text, expected):
    assert parse_profile(text) == expected


@pytest.mark.parametrize(
    "text", ["num_tokens=1,16", "batch=1,1,1", "num_tokens=4,2,8", "num_tokens=0,1,2", "num_tokens"]
)
def test_parse_profile_rejects(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_profile(text)


def test_input_profiles_follow_the_manifest_axis_names():
    q, t = QUERIES_AXIS, TOKENS_AXIS
    manifest = OnnxManifest(
        config=get_config("converseg_edge").to_dict(),
        opset=17,
        graphs={
            "decoder": GraphSpec(
                file="decoder.onnx",
                inputs=[
                    TensorSpec("image_embeddings", [1, 256, 32, 32], "float32"),
                    TensorSpec("text_features", [q, t, 384], "float32"),
                    TensorSpec("attention_mask", [q, t], "int64"),
                ],
                outputs=[],
            )
        },
        preprocessing={},
    )
    shapes = input_profiles(manifest, "decoder", {q: (1, 1, 8), t: (1, 16, 32)})
    assert "image_embeddings" not in shapes  # static: no profile entry
    assert shapes["text_features"] == ((1, 1, 384), (1, 16, 384), (8, 32, 384))
    assert shapes["attention_mask"] == ((1, 1), (1, 16), (8, 32))
    with pytest.raises(ValueError, match="no --profile"):
        input_profiles(manifest, "decoder", {q: (1, 1, 8)})


def test_query_limits_come_from_the_engine_profiles():
    profiles = {
        "image_encoder": {},
        "text_encoder": {
            "input_ids": [[1, 1], [1, 16], [8, 32]],
            "attention_mask": [[1, 1], [1, 16], [8, 32]],
        },
        "decoder": {
            "text_features": [[1, 1, 384], [2, 16, 384], [4, 32, 384]],
            "attention_mask": [[1, 1], [2, 16], [6, 32]],
        },
    }
    assert query_limits(profiles) == {"text_encoder": 8, "decoder": 4}
    assert query_limits({}) == {}  # a side-file without profiles: no limit known, nothing chunked


# --- the graphs' tensor names (converseg_core.artifacts) -------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_graph_specs_chain_the_stages_as_the_runtime_expects(name):
    """Each stage's inputs are the previous stage's outputs by name, the frame tensors are FrameContext's
    fields in order, and only the queries and tokens axes are dynamic."""
    specs = graph_specs(get_config(name))
    assert list(specs) == list(STAGES)
    encoder, context, text, decoder = (specs[s] for s in STAGES)
    assert frame_io_problem(context.output_names, decoder.input_names, encoder.output_names) is None
    assert context.input_names == encoder.output_names
    assert decoder.input_names == context.output_names + text.output_names + text.input_names[1:]
    axes = {axis for spec in specs.values() for named in spec.dynamic_axes().values() for axis in named.values()}
    assert axes == {QUERIES_AXIS, TOKENS_AXIS}
    assert not encoder.dynamic_axes() and not context.dynamic_axes()


def test_frame_io_problem_names_what_an_older_export_lacks():
    specs = graph_specs(get_config("converseg_edge"))
    old_context = specs["image_context"].output_names[:-1]  # an export from before hires_tokens
    problem = frame_io_problem(old_context, specs["decoder"].input_names)
    assert problem is not None and "hires_tokens" in problem


# --- side-file ------------------------------------------------------------------------------------------


def test_side_file_round_trip(tmp_path):
    original = side_file()
    original.save(tmp_path / SIDE_FILE_NAME)
    loaded = EngineSideFile.load(tmp_path / SIDE_FILE_NAME)
    assert asdict(loaded) == json.loads(json.dumps(asdict(original)))  # JSON turns tuples into lists
    rebuilt = json.loads(json.dumps(loaded.model_config.to_dict()))
    assert rebuilt == json.loads(json.dumps(get_config("converseg_edge").to_dict()))


def test_matching_side_file_is_accepted():
    side_file().check_compatible(tensorrt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7")


@pytest.mark.parametrize(
    "running, words",
    [
        (
            dict(tensorrt_version="8.6.2.3", gpu_name="Orin", compute_capability="8.7"),
            ["TensorRT 10.3.0.30", "8.6.2.3"],
        ),
        (
            dict(tensorrt_version="10.3.0.30", gpu_name="NVIDIA H100", compute_capability="9.0"),
            ["8.7", "9.0", "H100"],
        ),
        (dict(tensorrt_version="10.3.0.31", gpu_name="Orin", compute_capability="8.7"), ["10.3.0.31"]),
        (dict(tensorrt_version="10.3.0.30", gpu_name="Xavier", compute_capability="8.7"), ["Xavier"]),
    ],
)
def test_mismatched_side_file_is_refused_with_a_clear_error(running, words):
    with pytest.raises(EngineMismatchError) as info:
        side_file().check_compatible(**running)
    message = str(info.value)
    assert "refusing" in message and "build_trt.py" in message
    for word in words:
        assert word in message


def test_side_file_from_another_format_or_version_is_refused(tmp_path):
    path = tmp_path / SIDE_FILE_NAME
    path.write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a ConverSeg TensorRT side-file"):
        EngineSideFile.load(path)
    side_file(version=99).save(path)
    with pytest.raises(CheckpointError, match="version 99"):
        EngineSideFile.load(path)
    with pytest.raises(CheckpointError, match="not found"):
        EngineSideFile.load(tmp_path / "missing.json")
    frame = ["image_tokens", "fusion_keys", "fusion_values", "dense_queries", "hires_tokens", "concept_tokens"]
    features = ["image_embeddings", "hires_features", "concepts"]
    good = {
        "image_encoder": {"inputs": ["image"], "outputs": features},
        "image_context": {"inputs": features, "outputs": frame},
        "decoder": {"inputs": [*frame, "text_features", "attention_mask"], "outputs": []},
    }
    side_file(io=good).save(path)
    assert EngineSideFile.load(path).io == good
    stale = {**good, "image_context": {"inputs": features, "outputs": frame[1:]}}
    side_file(io=stale).save(path)
    with pytest.raises(CheckpointError, match="another version"):
        EngineSideFile.load(path)
    # engines built before the detail path (one encoder output) or before the concepts (two)
    for outputs in (features[:1], features[:2]):
        old_encoder = {**good, "image_encoder": {"inputs": ["image"], "outputs": outputs}}
        side_file(io=old_encoder).save(path)
        with pytest.raises(CheckpointError, match="another version"):
            EngineSideFile.load(path)


def write_placeholder_engines(folder: Path) -> None:
    """Stand-in engine files (not loadable by TensorRT) and a side-file whose checksums match them."""
    for stage in STAGES:
        (folder / f"{stage}.engine").write_bytes(stage.encode())
    engines = {
        s: {"file": f"{s}.engine", "sha256": sha256_file(folder / f"{s}.engine"), "precision": "fp16"}
        for s in STAGES
    }
    side_file(engines=engines).save(folder / SIDE_FILE_NAME)


def test_backend_refuses_a_swapped_engine_before_needing_tensorrt(tmp_path):
    write_placeholder_engines(tmp_path)
    (tmp_path / "decoder.engine").write_bytes(b"an engine from another build")
    with pytest.raises(CheckpointError, match="checksum"):
        TensorRTBackend.from_dir(tmp_path)


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the error given where TensorRT is missing")
def test_backend_without_tensorrt_raises_backend_unavailable(tmp_path):
    write_placeholder_engines(tmp_path)
    with pytest.raises(BackendUnavailableError, match="JetPack"):
        TensorRTBackend.from_dir(tmp_path)


# --- INT8 calibration, numpy half -------------------------------------------------------------------------


def _write_images(folder: Path, count: int, size=(40, 30)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        mode = ("RGB", "L", "RGBA")[i % 3]  # grey and alpha frames must come out RGB
        array = rng.integers(0, 255, size=(size[1], size[0], len(mode) if mode != "L" else 1), dtype=np.uint8)
        path = folder / f"frame_{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode).convert(
            "RGB" if path.suffix == ".jpg" else mode
        ).save(path)
        paths.append(path)
    (folder / "notes.txt").write_text("not an image")
    return paths


def _fake_preprocess(image: np.ndarray) -> np.ndarray:
    # Stands in for converseg_core.processing.preprocess: fixed 3 x 16 x 16 output that remembers the mean.
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    return np.full((1, 3, 16, 16), image.mean(), dtype=np.float32)


def test_calibration_batches_are_whole_and_shaped_like_the_engine_input(tmp_path):
    paths = find_images(_write_images(tmp_path / "calib", 7)[0].parent)
    assert len(paths) == 7  # notes.txt is not an image
    batcher = CalibrationBatcher(
        paths, preprocess=_fake_preprocess, input_shape=(3, 3, 16, 16), shuffle=False
    )
    batches = list(batcher)
    assert batcher.num_batches == 2 and len(batches) == 2 and batcher.num_images == 6  # 7th image left out
    assert all(b.shape == (3, 3, 16, 16) and b.dtype == np.float32 for b in batches)
    assert batches[0][1, 0, 0, 0] != batches[0][0, 0, 0, 0]  # each row is its own image
    assert batcher.batch_index == 1


def test_calibration_images_are_found_in_symlinked_folders(tmp_path):
    shard = _write_images(tmp_path / "dataset" / "shard-00000" / "images", 3)[0].parent
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "shard-00000").symlink_to(shard, target_is_directory=True)
    assert [p.name for p in find_images(tmp_path / "calib")] == [p.name for p in find_images(shard)]
    (shard / "loop").symlink_to(tmp_path / "calib", target_is_directory=True)  # a cycle: each image once
    assert len(find_images(tmp_path / "calib")) == 3


def test_calibration_selection_is_seeded_and_capped(tmp_path):
    paths = find_images(_write_images(tmp_path / "calib", 9)[0].parent)
    a = CalibrationBatcher(
        paths, preprocess=_fake_preprocess, input_shape=(1, 3, 16, 16), max_images=4, seed=3
    )
    b = CalibrationBatcher(
        paths, preprocess=_fake_preprocess, input_shape=(1, 3, 16, 16), max_images=4, seed=3
    )
    c = CalibrationBatcher(
        paths, preprocess=_fake_preprocess, input_shape=(1, 3, 16, 16), max_images=4, seed=4
    )
    assert a.paths == b.paths and len(a.paths) == 4
    assert a.paths != c.paths  # the seed picks the frames, spread over the folder
    assert (
        CalibrationBatcher(
            paths, preprocess=_fake_preprocess, input_shape=(1, 3, 16, 16), shuffle=False
        ).paths
        == paths
    )


def test_calibration_refuses_too_few_images_and_wrong_preprocessing(tmp_path):
    paths = find_images(_write_images(tmp_path / "calib", 2)[0].parent)
    with pytest.raises(ValueError, match="do not fill one batch"):
        CalibrationBatcher(paths, preprocess=_fake_preprocess, input_shape=(4, 3, 16, 16))
    batcher = CalibrationBatcher(paths, preprocess=_fake_preprocess, input_shape=(1, 3, 32, 32))
    with pytest.raises(ValueError, match="disagree"):
        next(iter(batcher))
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "nowhere")


def test_calibration_with_the_runtime_preprocessing(tmp_path):
    from converseg_core.processing import preprocess

    paths = find_images(_write_images(tmp_path / "calib", 2, size=(64, 48))[0].parent)
    cfg = get_config("converseg_edge").replace(img_size=64)

    def pre(image):
        return preprocess(
            image, img_size=cfg.img_size, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std
        ).tensor

    batch = next(iter(CalibrationBatcher(paths, preprocess=pre, input_shape=(1, 3, 64, 64))))
    assert batch.shape == (1, 3, 64, 64)
    assert np.all(batch[0, :, 48:, :] == 0)  # bottom padding of a 64 x 48 frame
    assert -3 < batch.min() < 0 < batch.max() < 3  # normalized, not 0..255


def test_calibration_cache_round_trip(tmp_path):
    cache = tmp_path / "sub" / "calibration.cache"
    assert read_cache(cache) is None and read_cache(None) is None
    write_cache(cache, memoryview(b"TRT-100300-EntropyCalibration2\n"))
    assert read_cache(cache) == b"TRT-100300-EntropyCalibration2\n"
    write_cache(None, b"ignored")


# --- needs TensorRT ---------------------------------------------------------------------------------------


@pytest.mark.tensorrt
@needs_tensorrt
def test_build_and_run_engines_match_onnxruntime(tmp_path):
    """On a machine with TensorRT and a GPU: build FP32 engines of a tiny export and compare with ORT."""
    from converseg_core.backends.onnxruntime_backend import OnnxRuntimeBackend
    from converseg_core.build import build_model
    from converseg_export.build_trt import build_engines
    from converseg_export.export_onnx import export_model, preprocessed_test_image

    onnx_dir = tmp_path / "onnx"
    export_model(build_model("converseg_edge", img_size=128), onnx_dir)
    build_engines(onnx_dir, tmp_path / "trt", precision="fp32", workspace_gb=1.0)
    trt_backend = TensorRTBackend.from_dir(tmp_path / "trt")
    ort_backend = OnnxRuntimeBackend.from_dir(onnx_dir, providers=["cpu"])
    image = preprocessed_test_image(ort_backend.config)
    np.testing.assert_allclose(
        trt_backend.encode_image(image), ort_backend.encode_image(image), rtol=1e-3, atol=1e-3
    )
    tokens = ort_backend_tokens(ort_backend, ["the red mug", "where can I put the knife"])
    results = []
    for backend in (trt_backend, ort_backend):
        frame = backend.prepare_frame(image)
        text = backend.encode_text(tokens.input_ids, tokens.attention_mask)
        results.append(backend.decode(frame, text, tokens.attention_mask))
    for got, want in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def ort_backend_tokens(backend, queries):
    from converseg_core.tokenizer import QueryTokenizer

    tokenizer = QueryTokenizer.from_file(backend.tokenizer_path)
    return tokenizer.encode(queries, backend.config.max_query_tokens)


@pytest.mark.tensorrt
@needs_tensorrt
def test_int8_calibrator_feeds_tensorrt(tmp_path):
    from converseg_core.backends.tensorrt_backend import import_cudart, import_tensorrt
    from converseg_export.build_trt import make_entropy_calibrator

    trt, cudart = import_tensorrt(), import_cudart()
    paths = find_images(_write_images(tmp_path / "calib", 2)[0].parent)
    batcher = CalibrationBatcher(paths, preprocess=_fake_preprocess, input_shape=(1, 3, 16, 16))
    calibrator = make_entropy_calibrator(trt, cudart, batcher, tmp_path / "calibration.cache")
    assert calibrator.get_batch_size() == 1
    assert isinstance(calibrator.get_batch(["image"])[0], int)
    assert calibrator.get_batch(["image"]) is not None
    assert calibrator.get_batch(["image"]) is None


@pytest.mark.parametrize("threshold", [0.0, 1.0, float("nan")])
def test_side_file_with_a_threshold_that_decides_nothing_is_refused(tmp_path, threshold):
    """engines.json is plain JSON: a presence_threshold edited to 0 would report every request present."""
    config = get_config("converseg_edge").replace(presence_threshold=threshold).to_dict()
    side_file(config=config).save(tmp_path / SIDE_FILE_NAME)
    with pytest.raises(CheckpointError, match="presence_threshold .* is not strictly between 0 and 1"):
        EngineSideFile.load(tmp_path / SIDE_FILE_NAME)
