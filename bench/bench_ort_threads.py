"""ONNX Runtime thread-pool configurations for the four ConverSeg graphs, compared in one run.

    python bench/bench_ort_threads.py --onnx-dir out/bench/onnx_converseg_edge_512 --threads 2

A new frame runs image_encoder, image_context and decoder back to back; a new request runs text_encoder then
decoder. How ONNX Runtime's worker threads wait between those calls matters on a small CPU:
- per-session-spin: a pool per session whose idle workers busy-wait (ONNX Runtime's default);
- per-session: a pool per session whose workers sleep when idle (what OnnxRuntimeBackend does);
- shared: ONNX Runtime's process-wide global pool for every session, spinning (not used by the backend: it
  measured the same as per-session here, and it forces every ONNX Runtime session of a process onto it).
Each configuration runs in its own process (the shared pool is process-wide), in interleaved rounds; the
model part only (no pre/post-processing). Prints medians; --markdown also writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a source checkout

MODES = ("per-session-spin", "per-session", "shared")


def run_child(onnx_dir: Path, mode: str, threads: int, repeats: int) -> dict[str, list[float]]:
    """One configuration in this process: new frame and new request latencies in ms."""
    import numpy as np
    import onnxruntime as ort

    from converseg_core.backends.onnxruntime_backend import OnnxManifest, OnnxRuntimeBackend
    from converseg_core.tokenizer import QueryTokenizer

    backend = OnnxRuntimeBackend.from_dir(onnx_dir, providers=["cpu"], num_threads=threads)
    if mode == "shared":  # ONNX Runtime refuses per-session pools once this is set: set it after from_dir
        from onnxruntime.capi import _pybind_state

        _pybind_state.set_global_thread_pool_sizes(threads, 1)
    if mode != "per-session":  # swap in sessions with the configuration under test, same graphs
        manifest = OnnxManifest.load(onnx_dir)
        for stage, graph in manifest.graphs.items():
            options = ort.SessionOptions()
            if mode == "shared":
                options.use_per_session_threads = False
            else:
                options.intra_op_num_threads = threads
            backend._sessions[stage] = ort.InferenceSession(
                str(onnx_dir / graph.file), options, providers=["CPUExecutionProvider"]
            )
    cfg = backend.config
    tokens = QueryTokenizer.from_file(backend.tokenizer_path).encode(
        ["where can I safely put the knife down?"], cfg.max_query_tokens
    )
    image = np.random.default_rng(0).standard_normal((1, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
    frame = backend.prepare_frame(image)
    text = backend.encode_text(tokens.input_ids, tokens.attention_mask)

    def new_frame():
        backend.decode(backend.prepare_frame(image), text, tokens.attention_mask)

    def new_request():
        backend.decode(
            frame, backend.encode_text(tokens.input_ids, tokens.attention_mask), tokens.attention_mask
        )

    out: dict[str, list[float]] = {"new_frame": [], "new_request": []}
    for _ in range(3):
        new_frame()
        new_request()
    for _ in range(repeats):
        for name, fn in (("new_frame", new_frame), ("new_request", new_request)):
            started = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - started) * 1e3)
            time.sleep(0.005)  # a camera frame or a request arrives later, not back to back
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--onnx-dir", type=Path, required=True, help="export folder (python export/export_onnx.py)"
    )
    p.add_argument("--threads", type=int, default=2, help="intra-op threads per pool")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per configuration per round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the configurations")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    p.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.onnx_dir, args.child, args.threads, args.repeats)))
        return 0
    samples: dict[str, dict[str, list[float]]] = {m: {"new_frame": [], "new_request": []} for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--onnx-dir", str(args.onnx_dir), "--threads", str(args.threads)]
            cmd += ["--repeats", str(args.repeats), "--child", mode]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            for key, values in result.items():
                samples[mode][key] += values
    lines = [
        f"ONNX Runtime thread pools, {args.threads} threads, {args.onnx_dir.name}, medians over "
        f"{args.repeats} x {args.rounds} runs (model only):",
        "",
        "| thread pools | new frame (ms) | new request: text + decoder (ms) |",
        "|---|---:|---:|",
    ]
    for mode in MODES:
        s = samples[mode]
        lines.append(
            f"| {mode} | {statistics.median(s['new_frame']):.1f} | {statistics.median(s['new_request']):.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
