"""Per-stage latency and peak memory of the runtime, per backend, variant and input size.

    python bench/bench_runtime.py                                  # edge + MobileSAM, 512 and 1024, torch + ORT
    python bench/bench_runtime.py --variants converseg_edge --sizes 512 --repeats 30 --rounds 3
    python bench/bench_runtime.py --variants converseg_edge converseg_edge+mask_presence --sizes 384 512
    python bench/bench_runtime.py --backends onnxruntime tensorrt --trt-dir out/trt_edge --sizes 512

Each (backend, variant, size) runs in its own fresh process, so its peak RSS is its own and the ONNX Runtime
and TensorRT processes are torch-free, as on the robot (the child records any torch module it finds). Stages,
timed one by one on a 640x480 frame and one query: pre-process, image encoder, image context (the decoder's
per-frame part), text encoder, decoder (its per-request part), post-process (upsample to the frame, threshold,
box); then, timed as wholes, "new frame" (pre-process + image encoder + image context + decoder +
post-process, query cached), "frame w/o pre" (the same without pre-processing: the issue's "new frame
(encoder, decoder, post-processing)"), "text + decoder" (what a new request on a cached frame costs the
model: the issue's "new query") and "new query" (text + decoder + post-process, the request answered as a
mask). Medians over --repeats runs after a warm-up, pooled over --rounds rounds that interleave all
configurations, so slow drift of a shared machine hits every configuration alike. Weights are random: the
speed does not depend on them. ONNX graphs are exported (with the parity check) into --work once and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a source checkout

from bench.machine import cpu_description  # noqa: E402

# onnxruntime-int8: the ONNX Runtime backend on the export with all four graphs quantized by
# export/quantize_onnx.py; onnxruntime-int8-frame: only the per-frame graphs (image encoder and context)
# quantized, the per-request ones float32. Their accuracy cost is measured there (docs/EXPORT.md), not here.
INT8_BACKENDS = {"onnxruntime-int8": "_int8", "onnxruntime-int8-frame": "_int8_frame"}
BACKENDS = ("torch", "onnxruntime", *INT8_BACKENDS, "tensorrt")
STAGES = (
    "preprocess",
    "image_encoder",
    "image_context",
    "text_encoder",
    "decoder",
    "postprocess",
    "new_frame",
    "frame_model",
    "text_decoder",
    "new_query",
)
COLUMNS = (
    "pre | image enc. | image ctx. | text enc. | decoder | post | new frame | frame w/o pre | text + dec. "
    "| new query"
)
QUERY = "where can I safely put the knife down?"
FRAME_SHAPE = (480, 640, 3)
WARMUP = 3


# --- child: one configuration, fresh process ---------------------------------------------------------------


def _median_ms(fn, repeats: int, cpu: list[float] | None = None) -> list[float]:
    """Wall-clock samples in ms; CPU time of the calling thread is appended to `cpu`. With --threads 1 both
    PyTorch and ONNX Runtime compute on the calling thread, so that CPU time is the latency an idle core
    would give, whatever else the machine runs."""
    for _ in range(WARMUP):  # allocations, lazy initialisation, first-run kernel selection
        fn()
    samples = []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.thread_time()
        fn()
        samples.append((time.perf_counter() - started) * 1e3)
        if cpu is not None:
            cpu.append((time.thread_time() - started_cpu) * 1e3)
    return samples


def variant_model(spec: str, size: int):
    """A registered variant at img_size `size`, random weights; `NAME+FLAG+...` also switches boolean config
    fields on (e.g. converseg_edge+mask_presence: the mask-evidence presence head) and `NAME+FIELD=NUMBER`
    sets a numeric one (converseg_edge+mask_refinement=0.5)."""
    from converseg_core.build import build_model

    name, fields = variant_fields(spec)
    return build_model(name, img_size=size, **fields)


def variant_fields(spec: str) -> tuple[str, dict]:
    """`NAME+FLAG+FIELD=NUMBER` -> (NAME, {FLAG: True, FIELD: NUMBER})."""
    name, *flags = spec.split("+")
    fields: dict = {}
    for flag in flags:
        field, _, value = flag.partition("=")
        fields[field] = float(value) if value else True
    return name, fields


def run_child(
    backend_name: str, variant: str, size: int, path: str | None, repeats: int, threads: int
) -> dict:
    import numpy as np

    rss_start = _rss_mb()
    started = time.perf_counter()
    if backend_name == "torch":
        import torch

        torch.set_num_threads(threads)
        from converseg_core.backends.torch_backend import TorchBackend

        torch.manual_seed(0)
        backend = TorchBackend(variant_model(variant, size).eval())
    elif backend_name.startswith("onnxruntime"):
        from converseg_core.backends.onnxruntime_backend import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend.from_dir(path, num_threads=threads)
    else:
        from converseg_core.backends.tensorrt_backend import TensorRTBackend

        backend = TensorRTBackend.from_dir(path)
    from converseg_core.processing import mask_box, preprocess, upsample_logits
    from converseg_core.segmenter import Segmenter

    # The runtime as the robot holds it: backend + tokenizer inside a Segmenter.
    segmenter = Segmenter(backend)
    load_s = time.perf_counter() - started
    rss_loaded = _rss_mb()
    cfg = backend.config
    frame = np.random.default_rng(0).integers(0, 255, size=FRAME_SHAPE, dtype=np.uint8)
    tokens = segmenter.tokenizer.encode([QUERY], cfg.max_query_tokens)
    ids, mask = tokens.input_ids, tokens.attention_mask

    def pre():
        return preprocess(frame, img_size=cfg.img_size, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std)

    def post(low, p):
        logits = upsample_logits(
            low, img_size=cfg.img_size, input_size=p.input_size, original_size=p.original_size
        )
        m = logits[0] > cfg.mask_threshold
        return mask_box(m)

    p = pre()
    features = backend.encode_image(p.tensor)
    context = backend.image_context(features)
    text = backend.encode_text(ids, mask)
    low, _, _ = backend.decode(context, text, mask)

    def new_frame():
        q = pre()
        c = backend.prepare_frame(q.tensor)
        post(backend.decode(c, text, mask)[0], q)

    def frame_model():  # the "new frame (encoder, decoder, post-processing)": no pre-processing
        c = backend.prepare_frame(p.tensor)
        post(backend.decode(c, text, mask)[0], p)

    def text_decoder():
        return backend.decode(context, backend.encode_text(ids, mask), mask)

    def new_query():
        post(text_decoder()[0], p)

    stages = {
        "preprocess": pre,
        "image_encoder": lambda: backend.encode_image(p.tensor),
        "image_context": lambda: backend.image_context(features),
        "text_encoder": lambda: backend.encode_text(ids, mask),
        "decoder": lambda: backend.decode(context, text, mask),
        "postprocess": lambda: post(low, p),
        "new_frame": new_frame,
        "frame_model": frame_model,
        "text_decoder": text_decoder,
        "new_query": new_query,
    }
    cpu_samples: dict[str, list[float]] = {stage: [] for stage in stages}
    samples = {stage: _median_ms(fn, repeats, cpu_samples[stage]) for stage, fn in stages.items()}
    banned = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    return {
        "backend": backend_name,
        "variant": variant,
        "size": size,
        "device": getattr(backend, "providers", None) or ("cpu" if backend_name == "torch" else "gpu"),
        "threads": threads,
        "load_s": load_s,
        "rss_start_mb": rss_start,
        "rss_loaded_mb": rss_loaded,
        "rss_peak_mb": _peak_rss_mb(),
        "torch_modules_loaded": len(banned),
        "samples_ms": samples,
        "cpu_samples_ms": cpu_samples,
    }


def _peak_rss_mb() -> float:
    """This process's own high-water RSS. Not ru_maxrss: Linux carries the parent's peak across fork + exec
    into it, so a child of a torch process would report torch's memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# --- parent: export once, run every configuration in fresh processes, aggregate -----------------------------


def model_code_digest() -> str:
    """sha256 of the code that decides what an export computes (the model and the exporter): a bench export
    made by other code is made again, not timed as if it were this code's."""
    import hashlib

    files = sorted((REPO / "converseg_core" / "modeling").glob("*.py")) + [REPO / "export" / "export_onnx.py"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_export(variant: str, size: int, work: Path, threads: int) -> Path:
    from converseg_core.artifacts import MANIFEST_NAME, OnnxManifest
    from converseg_core.errors import CheckpointError

    out = work / f"onnx_{variant}_{size}"
    code = model_code_digest()
    if (out / MANIFEST_NAME).is_file():
        try:
            if OnnxManifest.load(out).source.get("code") == code:
                return out
            print(f"[bench] {out} was exported by other model code: exporting again", flush=True)
        except CheckpointError as exc:  # written by another version of the exporter: export again
            print(f"[bench] {out}: {exc}", flush=True)
    import torch

    from export.export_onnx import export_model

    torch.manual_seed(0)
    print(f"[bench] exporting {variant} at {size} to {out} (once)", flush=True)
    export_model(
        variant_model(variant, size),
        out,
        source={"model": variant, "bench": True, "code": code},
        num_threads=threads,
    )
    return out


CALIBRATION_FRAMES = 16


def ensure_quantized(float_dir: Path, threads: int, backend: str = "onnxruntime-int8") -> Path:
    """The INT8 copy of a float32 bench export for an INT8 backend (onnxruntime-int8: all four graphs, the
    export/quantize_onnx.py default; onnxruntime-int8-frame: the per-frame graphs only), made once.
    The per-frame graphs are calibrated on synthetic camera-like frames: the weights are random, so only the
    speed means anything here; accuracy is measured on the trained model (docs/EXPORT.md)."""
    from PIL import Image

    from converseg_core.backends.onnxruntime_backend import OnnxManifest
    from converseg_core.errors import CheckpointError
    from export.export_onnx import camera_like_image
    from export.quantize_onnx import DEFAULT_GRAPHS, PER_FRAME_GRAPHS, quantize_export

    graphs = PER_FRAME_GRAPHS if backend == "onnxruntime-int8-frame" else DEFAULT_GRAPHS
    out = float_dir.with_name(float_dir.name + INT8_BACKENDS[backend])
    try:
        made = OnnxManifest.load(out)
        if (
            made.quantization.get("float32_source") == str(float_dir)
            and set(made.quantization["graphs"]) == set(graphs)
            and made.source.get("code") == OnnxManifest.load(float_dir).source.get("code")
        ):
            return out
    except CheckpointError:
        pass
    calib = float_dir.with_name("calibration_frames")
    calib.mkdir(exist_ok=True)
    for seed in range(CALIBRATION_FRAMES):
        Image.fromarray(camera_like_image(640, seed=seed)).save(calib / f"frame_{seed:02d}.png")
    print(f"[bench] quantizing {float_dir} into {out} (once)", flush=True)
    quantize_export(float_dir, out, graphs=graphs, num_threads=threads, calib_images=calib)
    return out


def machine_description() -> str:
    return (
        f"{cpu_description()}, Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def aggregate(runs: list[dict]) -> dict[tuple[str, str, int], dict]:
    pooled: dict[tuple[str, str, int], dict] = {}
    for run in runs:
        key = (run["backend"], run["variant"], run["size"])
        entry = pooled.setdefault(
            key,
            {
                **run,
                "samples_ms": {s: [] for s in STAGES},
                "cpu_samples_ms": {s: [] for s in STAGES},
                "rss_peak_mb": 0.0,
                "rss_loaded_mb": 0.0,
            },
        )
        for stage in STAGES:
            entry["samples_ms"][stage] += run["samples_ms"][stage]
            entry["cpu_samples_ms"][stage] += run["cpu_samples_ms"][stage]
        entry["rss_peak_mb"] = max(entry["rss_peak_mb"], run["rss_peak_mb"])
        entry["rss_loaded_mb"] = max(entry["rss_loaded_mb"], run["rss_loaded_mb"])
        entry["torch_modules_loaded"] = max(entry.get("torch_modules_loaded", 0), run["torch_modules_loaded"])
    for entry in pooled.values():
        entry["median_ms"] = {s: statistics.median(v) for s, v in entry["samples_ms"].items()}
        entry["median_cpu_ms"] = {s: statistics.median(v) for s, v in entry["cpu_samples_ms"].items()}
    return pooled


# The bundled default model's configuration (converseg_core/assets/converseg_edge.pt).
DEFAULT_EDGE = "converseg_edge_lite_concepts+mask_presence"


def targets(pooled: dict) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, from this run's medians: (target, measured, met or None when not measured)."""
    rows = []
    # The targets are the shipped default model's configuration when this run measured it, the bare
    # converseg_edge otherwise.
    measured = {variant for _, variant, _ in pooled}
    edge = DEFAULT_EDGE if DEFAULT_EDGE in measured else "converseg_edge"

    def get(backend, variant, size, stage):
        entry = pooled.get((backend, variant, size))
        return None if entry is None else entry["median_ms"][stage]

    def speedup(target: str, slow: float | None, fast: float | None, minimum: float, how: str) -> None:
        if not (slow and fast):
            rows.append((target, "not measured", None))
            return
        ratio = slow / fast
        rows.append((target, f"{ratio:.2f}x ({slow:.1f} {how} {fast:.1f} ms)", ratio >= minimum))

    # The new frame is "encoder, decoder, post-processing"; the camera frame's pre-processing (PIL
    # resize of 640x480, the same numpy code in every backend) is reported beside it, not hidden.
    for stage, what in (
        ("frame_model", "new frame (encoder, decoder, post)"),
        ("new_frame", "+ pre-processing"),
    ):
        for backend, how in (("onnxruntime", "ONNX Runtime"), ("onnxruntime-int8", "ONNX Runtime INT8")):
            speedup(
                f"edge at 512, {what}: {how} >= 3x faster than PyTorch eager",
                get("torch", edge, 512, stage),
                get(backend, edge, 512, stage),
                3,
                "->",
            )
    speedup(
        "edge image encoder >= 5x faster than MobileSAM TinyViT (ORT, 512)",
        get("onnxruntime", "converseg_mobilesam", 512, "image_encoder"),
        get("onnxruntime", edge, 512, "image_encoder"),
        5,
        "vs",
    )
    for backend, how in (
        ("onnxruntime", "ORT"),
        ("onnxruntime-int8", "ORT, INT8"),
        ("onnxruntime-int8-frame", "ORT, INT8 per-frame graphs"),
    ):
        query = get(backend, edge, 512, "text_decoder")
        with_post = get(backend, edge, 512, "new_query")
        if query is None and backend != "onnxruntime":
            continue
        rows.append(
            (
                f"edge, new query on a cached frame (text encoder + decoder, {how}, 512) <= 25 ms",
                "not measured"
                if query is None
                else f"{query:.1f} ms ({with_post:.1f} ms with the mask upsampled to 640x480)",
                None if query is None else query <= 25,
            )
        )
    if edge != "converseg_edge":
        # The pretrained encoder's budget: a new frame at most twice the from-scratch edge model's (all four
        # graphs INT8), same run; also with only the default's per-frame graphs quantized.
        fast = get("onnxruntime-int8", "converseg_edge", 512, "frame_model")
        for backend, how in (
            ("onnxruntime-int8", "ORT INT8"),
            ("onnxruntime-int8-frame", "ORT INT8 per-frame graphs"),
        ):
            slow = get(backend, edge, 512, "frame_model")
            if slow and fast:
                rows.append(
                    (
                        f"default at 512, new frame (encoder, decoder, post), {how}: <= 2x converseg_edge's",
                        f"{slow / fast:.2f}x ({slow:.1f} vs {fast:.1f} ms)",
                        slow / fast <= 2,
                    )
                )
    entry = pooled.get(("onnxruntime", edge, 512))
    if entry:
        rows.append(
            (
                "torch-free runtime, default model loaded: RSS <= 400 MB",
                f"{entry['rss_loaded_mb']:.0f} MB after load, {entry['rss_peak_mb']:.0f} MB peak, torch modules: {entry['torch_modules_loaded']}",
                entry["rss_peak_mb"] <= 400 and entry["torch_modules_loaded"] == 0,
            )
        )
    return rows


def to_markdown(pooled: dict, command: str, args, started: str, load: str) -> str:
    lines = [
        "# Runtime benchmarks: export/ backends",
        "",
        f"- Machine: {machine_description()}. {load}",
        f"- Date (UTC): {started}",
        f"- Command: `{command}`",
        f"- Medians in ms over {args.repeats} runs x {args.rounds} interleaved rounds per configuration, after 3 warm-up runs; "
        f"{args.threads} CPU threads for PyTorch and ONNX Runtime; random weights (speed does not depend on them); "
        "640x480 frame, one query of "
        f"{len(QUERY.split())} words.",
        "- image ctx. = the decoder's per-frame part (fusion image keys/values, dense queries), run once per frame; "
        "decoder = its per-request part. new frame = pre-process + image encoder + image context + decoder + "
        "post-process (query cached); frame w/o pre = the same without pre-processing (the issue's new frame: "
        "encoder, decoder, post-processing); text + dec. = text encoder + decoder (frame cached: the issue's new "
        "query); new query = text + dec. + post-process. The last four timed as wholes, not summed.",
        "- onnxruntime-int8: the same export with all four graphs quantized by export/quantize_onnx.py (image "
        f"encoder and image context static INT8, calibrated on {CALIBRATION_FRAMES} synthetic frames; text encoder "
        "and decoder dynamic INT8); its accuracy cost is measured on the trained default model in "
        "docs/EXPORT.md, not here. onnxruntime-int8-frame: only the two per-frame graphs quantized, text "
        "encoder and decoder float32.",
        "- RSS: each configuration runs in a fresh process; peak = VmHWM of that process (load + all runs).",
        "",
        f"| backend | variant | size | {COLUMNS} | RSS loaded / peak MB |",
        "|---|---|---|" + "---|" * len(STAGES) + "---|",
    ]
    for (backend, variant, size), e in sorted(pooled.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        m = e["median_ms"]
        lines.append(
            f"| {backend} | {variant} | {size} | "
            + " | ".join(f"{m[s]:.1f}" for s in STAGES)
            + f" | {e['rss_loaded_mb']:.0f} / {e['rss_peak_mb']:.0f} |"
        )
    if args.threads == 1:
        lines += [
            "",
            "CPU time of the calling thread (ms, median; with 1 thread this is the latency of an idle core):",
            "",
            f"| backend | variant | size | {COLUMNS} |",
            "|---|---|---|" + "---|" * len(STAGES),
        ]
        for (backend, variant, size), e in sorted(
            pooled.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])
        ):
            lines.append(
                f"| {backend} | {variant} | {size} | "
                + " | ".join(f"{e['median_cpu_ms'][s]:.1f}" for s in STAGES)
                + " |"
            )
    lines += ["", "## Targets (issue 5), from this run", "", "| target | measured | met |", "|---|---|---|"]
    for target, measured, met in targets(pooled):
        lines.append(f"| {target} | {measured} | {'n/a' if met is None else ('yes' if met else '**no**')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["converseg_edge", "converseg_mobilesam"],
        help="registered variants; NAME+FLAG switches a boolean config field on (converseg_edge+mask_presence), "
        "NAME+FIELD=NUMBER sets a numeric one (converseg_edge+mask_refinement=0.5)",
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024], help="img_size values")
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        default=["torch", "onnxruntime"],
        help="backends to run: torch (PyTorch eager), onnxruntime (float32 export), onnxruntime-int8 (all four "
        "graphs INT8), onnxruntime-int8-frame (image encoder and context INT8, text encoder and decoder "
        "float32), tensorrt (needs --trt-dir)",
    )
    parser.add_argument(
        "--trt-dir", type=Path, default=None, help="TensorRT engine folder (one variant and size)"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per stage per round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all configurations")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="CPU threads (torch, ONNX Runtime)"
    )
    parser.add_argument(
        "--work", type=Path, default=REPO / "out" / "bench", help="exported graphs and raw results"
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="also write the report here (e.g. docs/benchmarks/export.md)",
    )
    parser.add_argument(
        "--child", nargs=4, metavar=("BACKEND", "VARIANT", "SIZE", "PATH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    if args.child:
        backend, variant, size, path = args.child
        result = run_child(
            backend, variant, int(size), None if path == "-" else path, args.repeats, args.threads
        )
        print("RESULT " + json.dumps(result))
        return 0

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    args.work.mkdir(parents=True, exist_ok=True)
    configs = []
    for variant in args.variants:
        for size in args.sizes:
            for backend in args.backends:
                if backend.startswith("onnxruntime"):
                    path = str(ensure_export(variant, size, args.work, args.threads))
                    if backend in INT8_BACKENDS:
                        path = str(ensure_quantized(Path(path), args.threads, backend))
                elif backend == "tensorrt":
                    if args.trt_dir is None:
                        print("[bench] tensorrt skipped: no --trt-dir", file=sys.stderr)
                        continue
                    path = str(args.trt_dir)
                else:
                    path = "-"
                configs.append((backend, variant, size, path))
    runs = []
    for round_index in range(args.rounds):
        for backend, variant, size, path in configs:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                backend,
                variant,
                str(size),
                path,
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(
                    f"[bench] {backend} {variant} {size} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
                    file=sys.stderr,
                )
                return 1
            run = json.loads(lines[-1][len("RESULT ") :])
            runs.append(run)
            medians = {s: round(statistics.median(v), 1) for s, v in run["samples_ms"].items()}
            print(
                f"[bench] round {round_index + 1}: {backend} {variant} {size}: {medians}, peak RSS {run['rss_peak_mb']:.0f} MB",
                flush=True,
            )
    load_after = os.getloadavg()
    load = (
        f"Shared machine: 1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after the run "
        f"(other jobs were running, so absolute times are inflated and noisy; compare ratios within this run)."
    )
    (args.work / "results.json").write_text(json.dumps(runs, indent=1))
    pooled = aggregate(runs)
    command = "python bench/bench_runtime.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = to_markdown(pooled, command, args, started, load)
    print(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
