"""bench/bench_runtime.py judges the issue's runtime targets on the configuration the stack ships."""

import importlib.util
from pathlib import Path

import pytest

from converseg_core import default_checkpoint, load_checkpoint

_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_runtime.py"
_spec = importlib.util.spec_from_file_location("bench_runtime", _PATH)
bench_runtime = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_runtime)

STAGES = ("frame_model", "new_frame", "image_encoder", "text_decoder", "new_query")


def _entry(ms: float) -> dict:
    return {
        "median_ms": dict.fromkeys(STAGES, ms),
        "rss_loaded_mb": 200,
        "rss_peak_mb": 300,
        "torch_modules_loaded": 0,
    }


def test_default_edge_names_the_bundled_models_configuration():
    variant, fields = bench_runtime.variant_fields(bench_runtime.DEFAULT_EDGE)
    config = load_checkpoint(default_checkpoint()).config
    assert config.name == variant and fields
    assert all(getattr(config, name) == value for name, value in fields.items())
    assert bench_runtime.variant_fields("a+b+c=0.25") == ("a", {"b": True, "c": 0.25})


def test_targets_judge_the_default_configuration_when_measured():
    bare, default = "converseg_edge", bench_runtime.DEFAULT_EDGE
    pooled = {
        ("torch", bare, 512): _entry(90.0),
        ("onnxruntime", bare, 512): _entry(10.0),  # 9x: would pass
        ("torch", default, 512): _entry(90.0),
        ("onnxruntime", default, 512): _entry(45.0),  # 2x, 45 ms: the one judged, fails
    }
    rows = {t: (measured, met) for t, measured, met in bench_runtime.targets(pooled)}
    frame = rows[
        "edge at 512, new frame (encoder, decoder, post): ONNX Runtime >= 3x faster than PyTorch eager"
    ]
    assert frame == ("2.00x (90.0 -> 45.0 ms)", False)
    assert rows["edge, new query on a cached frame (text encoder + decoder, ORT, 512) <= 25 ms"][1] is False
    assert "default at 512, new frame (encoder, decoder, post), ORT INT8: <= 2x converseg_edge's" not in rows
    pooled[("onnxruntime-int8", bare, 512)] = _entry(20.0)
    pooled[("onnxruntime-int8", default, 512)] = _entry(41.0)
    rows = {t: (measured, met) for t, measured, met in bench_runtime.targets(pooled)}
    assert rows["default at 512, new frame (encoder, decoder, post), ORT INT8: <= 2x converseg_edge's"] == (
        "2.05x (41.0 vs 20.0 ms)",
        False,
    )
    pooled[("onnxruntime-int8-frame", default, 512)] = _entry(39.0)
    rows = {t: (measured, met) for t, measured, met in bench_runtime.targets(pooled)}
    frame_only = "default at 512, new frame (encoder, decoder, post), ORT INT8 per-frame graphs: <= 2x converseg_edge's"
    assert rows[frame_only] == ("1.95x (39.0 vs 20.0 ms)", True)
    del pooled[("onnxruntime-int8", bare, 512)], pooled[("onnxruntime-int8", default, 512)]
    del pooled[("onnxruntime-int8-frame", default, 512)]
    # without the default configuration in the run, the bare variant is judged
    del pooled[("torch", default, 512)], pooled[("onnxruntime", default, 512)]
    rows = {t: met for t, _, met in bench_runtime.targets(pooled)}
    assert rows["edge, new query on a cached frame (text encoder + decoder, ORT, 512) <= 25 ms"] is True


def test_memory_slope_is_megabytes_per_minute_and_rss_reads_this_process():
    import os

    from bench.machine import rss_mb, slope_per_min

    assert slope_per_min([(0.0, 100.0), (60.0, 101.0), (120.0, 102.0)]) == pytest.approx(1.0)
    assert slope_per_min([(0.0, 100.0)]) == 0.0
    assert 1.0 < rss_mb(os.getpid()) < 24 * 1024


def test_a_bench_export_is_made_once_and_reused(tmp_path):
    """The benchmark exports each variant once (with the exporter's parity check) and reuses the folder
    while the model code is unchanged."""
    out = bench_runtime.ensure_export("converseg_edge", 64, tmp_path, 1)
    manifest = out / "manifest.json"
    first = manifest.stat().st_mtime_ns
    assert bench_runtime.ensure_export("converseg_edge", 64, tmp_path, 1) == out
    assert manifest.stat().st_mtime_ns == first


def test_the_per_frame_int8_backend_quantizes_only_the_per_frame_graphs(tmp_path):
    """onnxruntime-int8-frame benchmarks an export whose image encoder and context are INT8 and whose text
    encoder and decoder stay float32; it is made once, beside the float32 folder, and reused."""
    from converseg_core.artifacts import OnnxManifest

    float_dir = bench_runtime.ensure_export("converseg_edge", 64, tmp_path, 1)
    out = bench_runtime.ensure_quantized(float_dir, 1, "onnxruntime-int8-frame")
    assert out == float_dir.with_name(float_dir.name + "_int8_frame")
    assert set(OnnxManifest.load(out).quantization["graphs"]) == {"image_encoder", "image_context"}
    manifest = out / "manifest.json"
    first = manifest.stat().st_mtime_ns
    assert bench_runtime.ensure_quantized(float_dir, 1, "onnxruntime-int8-frame") == out
    assert manifest.stat().st_mtime_ns == first
