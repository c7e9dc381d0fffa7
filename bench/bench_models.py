"""Image encoder and decoder latency of every registered variant on the CPU, PyTorch eager.

    .venv/bin/python bench/bench_models.py --sizes 512 1024 --repeats 5 --out bench/out/models.md

Random weights (latency does not depend on them). The decoder is timed for one query of 12 tokens on a
cached image embedding, the way the Segmenter runs it. Medians of --repeats runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a source checkout
from bench.machine import cpu_description  # noqa: E402
from converseg_core import build_model, list_models  # noqa: E402


@dataclass
class Row:
    model: str
    size: int
    params_m: float
    encoder_ms: float
    decoder_ms: float


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, one-time kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def bench_variant(name: str, size: int, repeats: int) -> Row:
    model = build_model(name, img_size=size, pretrained_text=False).eval()
    image = torch.randn(1, 3, size, size)
    features = model.encode_image(image)
    text = torch.randn(1, 12, model.config.text_hidden_dim)
    mask = torch.ones(1, 12, dtype=torch.long)
    params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("image_encoder.")) / 1e6
    return Row(
        model=name,
        size=size,
        params_m=params,
        encoder_ms=median_ms(lambda: model.encode_image(image), repeats),
        decoder_ms=median_ms(lambda: model.decode(features, text, mask), repeats),
    )


def run(variants: list[str], sizes: list[int], repeats: int, threads: int) -> list[Row]:
    torch.set_num_threads(threads)
    rows = []
    for size in sizes:
        for name in variants:
            row = bench_variant(name, size, repeats)
            print(
                f"{row.model:22s} {row.size:5d}  encoder {row.encoder_ms:9.1f} ms  decoder {row.decoder_ms:7.1f} ms",
                flush=True,
            )
            rows.append(row)
    return rows


def to_markdown(rows: list[Row], repeats: int, threads: int) -> str:
    lines = [
        f"Machine: {cpu_description()}, {threads} threads, torch {torch.__version__}; "
        f"{date.today().isoformat()}; median of {repeats} runs.",
        "",
        "| model | input | image encoder params (M) | image encoder (ms) | decoder, 1 query (ms) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.model} | {r.size} | {r.params_m:.1f} | {r.encoder_ms:.1f} | {r.decoder_ms:.1f} |" for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list_models(),
        default=list_models(),
        help="registered variants to time (default: all)",
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024], help="network input sides")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="also write a markdown table here")
    args = parser.parse_args(argv)
    rows = run(args.variants, args.sizes, args.repeats, args.threads)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(to_markdown(rows, args.repeats, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
