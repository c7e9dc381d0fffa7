"""What request anchoring costs a new request, and what its phrasing memory costs at start-up.

    .venv/bin/python bench/bench_anchoring.py --out bench/out/anchoring
    .venv/bin/python bench/bench_anchoring.py --backend onnxruntime --checkpoint out/onnx_default \
        --out bench/out/anchoring_ort        # an export of the bundled model (export/export_onnx.py)

The model in two Segmenters on one frame (a real photograph from tests/data/real_photos): one with its
phrasing memory, one without. Each request is timed as a robot sends it, new (the text cache emptied before
each run): `set_queries` (tokenizer, text encoder, the memory look-up and the anchor's text encoding when one
applies), then `predict` (decoder, post-processing at camera resolution; the Segmenter's own stage timings).
Three requests: one that gets anchored (a new wording of a concept), one that names objects (looked up,
kept), one that is itself a trained phrasing. Medians over --repeats runs per round, pooled over --rounds
rounds that interleave all configurations. Start-up: the memory embedded with an empty cache (once) and read
back from the cache. Writes OUT/results.json and OUT/results.md."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a source checkout
from bench.machine import cpu_description  # noqa: E402

REQUESTS = {
    "anchored": "what could give me an electric shock?",
    "names objects": "the red mug left of the plate",
    "trained phrasing": "Something I can drink from",
}
PHOTO = Path(__file__).resolve().parents[1] / "tests" / "data" / "real_photos" / "images"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint, or exported folder for --backend onnxruntime (default: the bundled model)",
    )
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch", help="runtime")
    p.add_argument(
        "--phrasings",
        type=Path,
        default=None,
        help="phrasing memory (default: the one beside the checkpoint)",
    )
    p.add_argument("--repeats", type=int, default=20, help="timed runs per request per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch, ONNX Runtime)")
    p.add_argument("--out", type=Path, default=Path("bench/out/anchoring"), help="output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import numpy as np
    from PIL import Image

    from converseg_core import Segmenter
    from converseg_core.anchoring import PhrasingMemory, Phrasings, sidecar_path
    from converseg_core.weights import default_checkpoint

    if args.backend == "torch":
        import torch

        torch.set_num_threads(args.threads)
        options = {}
    elif args.checkpoint is None:
        print("error: --backend onnxruntime needs --checkpoint DIR (export/export_onnx.py)", file=sys.stderr)
        return 2
    else:
        options = {"num_threads": args.threads}
    checkpoint = args.checkpoint or default_checkpoint()
    memory_file = args.phrasings or sidecar_path(checkpoint)
    if not memory_file.is_file():
        print(f"error: no phrasing memory at {memory_file} (pass --phrasings)", file=sys.stderr)
        return 2
    phrasings = Phrasings.load(memory_file)
    plain = Segmenter.from_checkpoint(checkpoint, backend=args.backend, anchoring=False, **options)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        PhrasingMemory.build(phrasings, plain.encode_texts, cache=Path(cache))
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        PhrasingMemory.build(phrasings, plain.encode_texts, cache=Path(cache))
        warm_s = time.perf_counter() - start
    anchored = Segmenter.from_checkpoint(checkpoint, backend=args.backend, anchoring=memory_file, **options)
    frame = np.asarray(Image.open(sorted(PHOTO.glob("*"))[0]).convert("RGB"))
    for seg in (plain, anchored):
        seg.set_image(frame)

    configs = {"without memory": plain, "with memory": anchored}
    parts = ("text", "decoder", "post", "total")
    samples: dict[tuple[str, str, str], list[float]] = {}
    seen_anchor: dict[str, str | None] = {}
    for _ in range(args.rounds):
        for kind, request in REQUESTS.items():
            for name, seg in configs.items():
                for i in range(args.repeats + 1):
                    seg.clear_text_cache()
                    t0 = time.perf_counter()
                    seg.set_queries([request])  # tokenizer, text encoder, look-up, the anchor's encoding
                    t1 = time.perf_counter()
                    (result,) = seg.predict()
                    t2 = time.perf_counter()
                    if i:  # the first run of a round warms up
                        got = {
                            "text": (t1 - t0) * 1e3,
                            "decoder": result.timings["decode_ms"],
                            "post": result.timings["postprocess_ms"],
                            "total": (t2 - t0) * 1e3,
                        }
                        for part in parts:
                            samples.setdefault((kind, name, part), []).append(got[part])
                if seg is anchored:
                    seen_anchor[kind] = result.anchor
    if seen_anchor["anchored"] is None or seen_anchor["names objects"] or seen_anchor["trained phrasing"]:
        print(f"error: the memory did not anchor as this benchmark assumes: {seen_anchor}", file=sys.stderr)
        return 1
    rows = {
        kind: {
            name: {part: statistics.median(samples[(kind, name, part)]) for part in parts} for name in configs
        }
        for kind in REQUESTS
    }
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": cpu_description(),
        "command": "python bench/bench_anchoring.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "backend": args.backend,
        "checkpoint": str(checkpoint),
        "phrasings": str(memory_file),
        "memory_size": len(phrasings.texts),
        "memory_cold_s": cold_s,
        "memory_cached_s": warm_s,
        "new_request_ms": rows,
        "anchors": seen_anchor,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "threads": args.threads,
    }
    lines = [
        f"# Request anchoring: cost ({report['date']}, {report['machine']}, {args.backend}, "
        f"{args.threads} threads)",
        "",
        f"`{report['command']}`; medians over {args.repeats} x {args.rounds} runs, frame "
        f"{frame.shape[1]} x {frame.shape[0]}. text = tokenizer + text encoder (+ look-up + the anchor's "
        "encoding with the memory); text + decoder is what a new request on a cached frame costs the model.",
        "",
        "| new request | memory | text, ms | decoder, ms | text + decoder, ms | post, ms | total, ms | anchor |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for kind, request in REQUESTS.items():
        for name in configs:
            r = rows[kind][name]
            anchor = (seen_anchor[kind] or "-") if name == "with memory" else ""
            lines.append(
                f'| {kind}: "{request}" | {name} | {r["text"]:.1f} | {r["decoder"]:.1f} | '
                f"{r['text'] + r['decoder']:.1f} | {r['post']:.1f} | {r['total']:.1f} | {anchor} |"
            )
    lines += [
        "",
        f"Phrasing memory: {len(phrasings.texts)} phrasings; embedded with an empty cache in {cold_s:.1f} s "
        f"(once per text encoder), read from the cache in {warm_s:.2f} s.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
