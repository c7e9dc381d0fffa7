"""Fuzz and soak of the segment node over real ROS 2, loopback only: nothing malformed may crash it.

    python bench/bench_ros_fuzz.py                                  # 1,200 messages, 10-minute soak
    python bench/bench_ros_fuzz.py --messages 300 --soak-minutes 1  # a quick look

1. reference: the node (random weights, fixed for the run) answers a reference request on a fixed frame;
   the mask's bytes are hashed.
2. fuzz: --messages malformed or hostile messages, round-robin over every kind in KINDS (raw images with
   bad fields, compressed payloads, query strings, serialized query bytes), against a node with raw
   transport and, for the compressed kinds, a second node with image_transport:=compressed.
3. the reference request again: the mask must be byte-identical, the node still running, and every kind
   counted in /diagnostics (nothing silently dropped without a reason).
4. soak: a --rate-hz camera for --soak-minutes against the raw node; its resident memory (VmRSS) is
   sampled every 2 s and a least-squares slope taken after --warmup-s.

Writes bench/out/ros_fuzz.md and .json (--out-dir); docs/BENCHMARKS.md quotes the figures.
SAFETY: runs itself inside `unshare -rn` (only loopback) where allowed, always with discovery pinned to
LOCALHOST (converseg_ros.loopback.LOOPBACK_VARIABLES) and its own ROS_DOMAIN_ID; bounded in messages and time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "converseg_ros"))

sys.path.append(str(REPO))  # bench.machine
from converseg_ros.loopback import fenced, loopback_env, unshare_works  # noqa: E402

from bench.machine import cpu_description, rss_mb, slope_per_min  # noqa: E402

TINY_MODEL = {"random_model": "converseg_edge", "random_model_img_size": 128}
REFERENCE_QUERY = "the red mug"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1200, help="malformed messages to send in all")
    parser.add_argument("--soak-minutes", type=float, default=10.0, help="length of the soak (0 = none)")
    parser.add_argument(
        "--warmup-s", type=float, default=60.0, help="soak seconds left out of the memory slope"
    )
    parser.add_argument("--rate-hz", type=float, default=30.0, help="camera rate of the soak")
    parser.add_argument("--width", type=int, default=640, help="soak frame width")
    parser.add_argument("--height", type=int, default=480, help="soak frame height")
    parser.add_argument("--domain-id", type=int, default=72, help="ROS_DOMAIN_ID (distinct per run)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "out", help="report folder")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------------------------------ message kinds
def _png(width: int, height: int, *, mode: str = "RGB") -> bytes:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _forged_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(64)))
        + chunk(b"IEND", b"")
    )


def _encoded(fmt: str, **save) -> bytes:
    import numpy as np
    from PIL import Image as PILImage

    rgb = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format=fmt, **save)
    return buf.getvalue()


def _cdr(payload: bytes, *, length: int | None = None, header: bytes = b"\x00\x01\x00\x00") -> bytes:
    body = payload + b"\x00"
    return header + (len(body) if length is None else length).to_bytes(4, "little") + body


def raw_image_kinds() -> dict[str, dict]:
    """Image message fields (over a valid 32 x 24 rgb8 frame) that the node must refuse or survive."""
    ok = dict(height=24, width=32, encoding="rgb8", is_bigendian=0, step=96, data=bytes(24 * 96))
    return {
        "encoding_yuv422": ok | {"encoding": "yuv422"},
        "encoding_32FC1": ok | {"encoding": "32FC1", "step": 128, "data": bytes(24 * 128)},
        "encoding_empty": ok | {"encoding": ""},
        "encoding_upper_case": ok | {"encoding": "RGB8"},
        "encoding_10k": ok | {"encoding": "x" * 10_000},
        "encoding_nul": ok | {"encoding": "rgb8\x00bgr8"},
        "data_short": ok | {"data": bytes(100)},
        "data_long": ok | {"data": bytes(24 * 96 + 1)},
        "data_empty": ok | {"data": b""},
        "step_zero": ok | {"step": 0},
        "step_too_small": ok | {"step": 95, "data": bytes(24 * 95)},
        "step_huge": ok | {"step": 2**32 - 1},
        "width_zero": ok | {"width": 0},
        "height_zero": ok | {"height": 0},
        "width_max_uint32": ok | {"width": 2**32 - 1},
        "height_70000": ok | {"height": 70_000},
        "mono16_odd_bytes": ok | {"encoding": "mono16", "step": 63, "data": bytes(24 * 63)},
        "bigendian_flag_on_rgb8": ok | {"is_bigendian": 1},
        "frame_id_10k": ok | {"frame_id": "f" * 10_000},
        "stamp_negative": ok | {"sec": -1},
        "nanosec_out_of_range": ok | {"nanosec": 4_000_000_000},
    }


def compressed_kinds() -> dict[str, tuple[str, bytes]]:
    """(format, payload) pairs for the compressed transport."""
    jpeg = _encoded("JPEG")
    png = _encoded("PNG")
    return {
        "compressed_empty": ("jpeg", b""),
        "compressed_garbage": ("jpeg", os.urandom(512)),
        "compressed_truncated_jpeg": ("jpeg", jpeg[: len(jpeg) // 2]),
        "compressed_truncated_png": ("png", png[: len(png) // 3]),
        "compressed_png_bomb_100000": ("png", _forged_png(100_000, 100_000)),
        "compressed_png_header_5000": ("png", _forged_png(5000, 5000)),
        "compressed_png_4097_wide": ("png", _png(4097, 1)),
        "compressed_corrupt_jpeg_body": ("jpeg", jpeg[:200] + bytes(len(jpeg) - 200)),
        "compressed_gif": ("gif", _encoded("GIF")),
        "compressed_bmp": ("bmp", _encoded("BMP")),
        "compressed_png_16bit_grey": ("png", _png(64, 48, mode="I;16")),
        "compressed_format_lies": ("h265; garbage", png),
    }


def query_kinds() -> dict[str, bytes]:
    """Serialized std_msgs/String payloads (published as raw bytes, as a C++ node could send them)."""
    text = {
        "query_empty": "",
        "query_whitespace": " \t\n ",
        "query_10k": "x" * 10_000,
        "query_257_chars": "y" * 257,
        "query_empty_object": "{}",
        "query_set_without_queries": '{"op": "set"}',
        "query_unclosed_json": '{"op": "add", "queries": ["a"',
        "query_unknown_op": '{"op": "explode"}',
        "query_queries_not_list": '{"op": "add", "queries": "mug"}',
        "query_list_of_numbers": "[1, 2, 3]",
        "query_list_with_null": "[null]",
        "query_extra_key": '{"op": "set", "queries": ["a"], "x": 1}',
        "query_65_queries": json.dumps([f"q{i}" for i in range(65)]),
        "query_lone_surrogate": '["mug \\ud800"]',
        "query_escaped_nul": '["ok\\u0000"]',
        "query_bell": "mug\x07",
        "query_replacement_char": "mug \ufffd",
        "query_nested_500": "[" * 500 + "]" * 500,
    }
    out = {name: _cdr(t.encode("utf-8")) for name, t in text.items()}
    out |= {
        "query_bytes_not_utf8": _cdr(b"mug \xff\xfe"),
        "query_embedded_nul": _cdr(b"ok\x00\xff"),
        "query_cdr_length_past_end": _cdr(b"mug", length=1000),
        "query_cdr_length_zero": _cdr(b"", length=0),
        "query_cdr_big_endian_header": _cdr(b"mug", header=b"\x00\x00\x00\x00"),
        "query_cdr_bad_header": b"\x07\x07\x07\x07" + b"\x00" * 8,
    }
    return out


# ------------------------------------------------------------------------------------------ inside the fence
class Bench:
    """The bench's side of the wire: one rclpy node publishing frames and requests, collecting answers."""

    def __init__(self, tmp: Path) -> None:
        import rclpy
        from converseg_ros.segment_node import IMAGE_TOPIC, OUTPUT_QOS, QUERY_QOS, QUERY_TOPIC
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import String

        rclpy.init()
        self.rclpy, self.tmp = rclpy, tmp
        self.node = rclpy.create_node("converseg_fuzz")
        self.image_pub = self.node.create_publisher(Image, IMAGE_TOPIC, qos_profile_sensor_data)
        self.compressed_pub = self.node.create_publisher(
            CompressedImage, IMAGE_TOPIC + "/compressed", qos_profile_sensor_data
        )
        self.query_pub = self.node.create_publisher(String, QUERY_TOPIC, QUERY_QOS["volatile"])
        self.masks: dict[tuple[int, int], bytes] = {}
        self.diagnostics: list = []
        self.node.create_subscription(
            Image, "/converseg/mask", lambda m: self.masks.setdefault((m.header.stamp.sec, m.header.stamp.nanosec), bytes(m.data)), OUTPUT_QOS
        )  # fmt: skip
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self.Image, self.CompressedImage, self.String = Image, CompressedImage, String

    def start_node(self, name: str, params: dict) -> subprocess.Popen:
        from converseg_ros.launch_plan import params_file_text

        (self.tmp / f"{name}.yaml").write_text(params_file_text("/**", params))
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the node
        return subprocess.Popen(
            [sys.executable, "-m", "converseg_ros.segment_node", "--ros-args", "--params-file", str(self.tmp / f"{name}.yaml")],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def spin(self, seconds: float, until: Callable[[], bool] = lambda: False) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if until():
                return True
            self.rclpy.spin_once(self.node, timeout_sec=0.01)
        return until()

    def wait_for(self, pub, seconds: float = 90) -> None:
        assert self.spin(seconds, lambda: pub.get_subscription_count() > 0), "the node never subscribed"

    def image(self, stamp_sec: int, **fields) -> None:
        """Publish an Image with ``fields``; ``sec``, ``nanosec`` and ``frame_id`` go to its header."""
        sec, nanosec = fields.pop("sec", stamp_sec), fields.pop("nanosec", 0)
        frame_id = fields.pop("frame_id", "fuzz")
        msg = self.Image(**fields)
        msg.header.frame_id = frame_id
        # Out-of-range stamps cannot be set through the typed message: clamp what rclpy refuses, keep the rest.
        msg.header.stamp.sec = max(-(2**31), min(2**31 - 1, sec))
        msg.header.stamp.nanosec = min(nanosec, 2**32 - 1)
        self.image_pub.publish(msg)

    def compressed(self, sec: int, fmt: str, data: bytes) -> None:
        msg = self.CompressedImage(format=fmt, data=data)
        msg.header.stamp.sec = sec
        self.compressed_pub.publish(msg)

    def reference_mask(self, sec: int, frame_fields: dict, compressed: bytes | None = None) -> bytes:
        """The mask of the reference request on the reference frame (resent until answered)."""
        self.wait_for(self.query_pub)
        self.query_pub.publish(self.String(data=REFERENCE_QUERY))
        self.spin(0.5)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if compressed is None:
                self.image(sec, **frame_fields)
            else:
                self.compressed(sec, "png", compressed)
            if self.spin(0.1, lambda: (sec, 0) in self.masks):
                return self.masks[(sec, 0)]
        raise AssertionError("no answer to the reference request")

    def last_diagnostics(self) -> dict:
        if not self.diagnostics:
            return {}
        status = self.diagnostics[-1].status[0]
        return {kv.key: kv.value for kv in status.values} | {"message": status.message}

    def close(self) -> None:
        self.node.destroy_node()
        self.rclpy.try_shutdown()


def stop(proc: subprocess.Popen) -> int | str:
    import signal

    if proc.poll() is not None:
        return f"exited early with {proc.returncode}"
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return "killed"


def fuzz_phase(
    bench: Bench, name: str, params: dict, kinds: dict, send, budget: int, reference, spacing_s: float
) -> dict:
    """Start a node, take the reference answer, send ``budget`` messages round-robin over ``kinds``
    ``spacing_s`` apart (camera topics are best effort, depth 1: closer frames replace each other), take the
    reference answer again and stop the node."""
    proc = bench.start_node(name, TINY_MODEL | params | {"diagnostics_period": 0.5})
    bench.diagnostics.clear()
    before = reference(1)
    sent: Counter = Counter()
    names = list(kinds)
    t0 = time.monotonic()
    for i in range(budget):
        kind = names[i % len(names)]
        send(kind, kinds[kind], 1000 + i)
        sent[kind] += 1
        bench.spin(spacing_s)
    fuzz_seconds = time.monotonic() - t0
    bench.spin(2.0)
    alive = proc.poll() is None
    after = reference(2)
    bench.spin(1.5)
    diagnostics = bench.last_diagnostics()
    rc = stop(proc)
    log = (bench.tmp / f"{name}.log").read_text()
    return {
        "sent": sum(sent.values()),
        "kinds": len(sent),
        "seconds": round(fuzz_seconds, 1),
        "alive_after_fuzz": alive,
        "reference_unchanged": hashlib.sha256(before).hexdigest() == hashlib.sha256(after).hexdigest(),
        "exit_code": rc,
        "tracebacks_in_log": log.count("Traceback"),
        "frames_received": int(diagnostics.get("frames_received", 0)),
        "diagnostics": diagnostics,
        "rejected": {k: int(v) for k, v in diagnostics.items() if k.startswith("rejected.")},
    }


def run_inside(args: argparse.Namespace, tmp: Path) -> dict:
    from converseg_ros.demo_scene import synthetic_frames
    from converseg_ros.image_conversion import rgb_to_image_fields

    bench = Bench(tmp)
    out: dict = {}
    ref_fields = rgb_to_image_fields(synthetic_frames(160, 120, count=1)[0], "rgb8")
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(synthetic_frames(160, 120, count=1)[0]).save(buf, format="PNG")
    ref_png = buf.getvalue()
    try:
        raw, queries, compressed = raw_image_kinds(), query_kinds(), compressed_kinds()
        raw_and_queries = {f"image:{k}": v for k, v in raw.items()} | {
            f"query:{k}": v for k, v in queries.items()
        }

        def send_raw(kind: str, value, sec: int) -> None:
            if kind.startswith("image:"):
                bench.image(sec, **value)
            else:
                bench.query_pub.publish(value)  # serialized bytes

        budget_compressed = max(
            len(compressed), args.messages * len(compressed) // (len(compressed) + len(raw_and_queries))
        )
        out["raw_node"] = fuzz_phase(
            bench, "raw", {}, raw_and_queries, send_raw, args.messages - budget_compressed,
            lambda sec: bench.reference_mask(sec, ref_fields), 0.01,
        )  # fmt: skip
        out["compressed_node"] = fuzz_phase(
            bench, "compressed", {"image_transport": "compressed"}, compressed,
            lambda kind, value, sec: bench.compressed(sec, *value), budget_compressed,
            lambda sec: bench.reference_mask(sec, {}, compressed=ref_png), 0.04,
        )  # fmt: skip

        if args.soak_minutes > 0:
            proc = bench.start_node("soak", TINY_MODEL | {"publish_overlay": False})
            bench.reference_mask(1, ref_fields)
            soak_fields = rgb_to_image_fields(synthetic_frames(args.width, args.height, count=1)[0], "rgb8")
            bench.masks.clear()
            samples: list[tuple[float, float]] = []
            period, t0, n, next_sample = 1.0 / args.rate_hz, time.monotonic(), 0, 0.0
            while (elapsed := time.monotonic() - t0) < args.soak_minutes * 60:
                n += 1
                bench.image(10 + n, **soak_fields)
                if elapsed >= next_sample:
                    samples.append((elapsed, rss_mb(proc.pid)))
                    next_sample += 2.0
                    bench.masks.clear()  # keep this process's own memory flat
                bench.spin(max(0.0, t0 + n * period - time.monotonic()))
            settled = [(t, m) for t, m in samples if t >= args.warmup_s]
            bench.spin(1.5)
            out["soak"] = {
                "minutes": round((time.monotonic() - t0) / 60, 2),
                "frames_sent": n,
                "frames_processed": int(bench.last_diagnostics().get("frames_processed", 0)),
                "rss_mb_first": samples[0][1],
                "rss_mb_after_warmup": settled[0][1] if settled else float("nan"),
                "rss_mb_last": samples[-1][1],
                "rss_mb_per_min_after_warmup": round(slope_per_min(settled), 3),
                "samples": len(samples),
                "alive": proc.poll() is None,
                "exit_code": stop(proc),
            }
            out["soak"]["rss_mb_max"] = max(m for _, m in samples)
    finally:
        bench.close()
    return out


# ------------------------------------------------------------------------------------------ outside
def report(result: dict, args: argparse.Namespace, command: str) -> str:
    cpu = cpu_description()
    lines = [
        "# Fuzz and soak of the segment node (bench/bench_ros_fuzz.py)",
        "",
        f"- Machine: {cpu}; {platform.platform()}; Python {platform.python_version()}",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{command}`",
        f"- Loopback only (`unshare -rn`: {unshare_works()}); model converseg_edge, random weights, 128 px.",
        "",
        "| node | messages sent | kinds | frames the node received | alive after | reference answer unchanged | exit code | tracebacks |",
        "|---|---:|---:|---:|---|---|---|---:|",
    ]
    for name in ("raw_node", "compressed_node"):
        r = result[name]
        lines.append(f"| {name} | {r['sent']} | {r['kinds']} | {r['frames_received']} | {r['alive_after_fuzz']} | {r['reference_unchanged']} "
                     f"| {r['exit_code']} | {r['tracebacks_in_log']} |")  # fmt: skip
    for name in ("raw_node", "compressed_node"):
        counted = ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in sorted(result[name]["rejected"].items()))
        lines.append(f"\n{name} rejections counted in /diagnostics: {counted}")
    soak = result.get("soak")
    if soak:
        lines += [
            "",
            f"Soak: {soak['minutes']} min at {args.rate_hz:g} Hz, {args.width}x{args.height} rgb8: {soak['frames_sent']} "
            f"frames sent, {soak['frames_processed']} segmented (the rest dropped as stale, by design).",
            f"Node resident memory: start {soak['rss_mb_first']:.0f} MB, after {args.warmup_s:g} s warm-up "
            f"{soak['rss_mb_after_warmup']:.0f} MB, end {soak['rss_mb_last']:.0f} MB, max {soak['rss_mb_max']:.0f} MB; "
            f"slope after warm-up **{soak['rss_mb_per_min_after_warmup']:+.3f} MB/min** (least squares over "
            f"{soak['samples']} samples every 2 s). Alive at the end: {soak['alive']}, exit code {soak['exit_code']}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.inside:
        with tempfile.TemporaryDirectory(prefix="converseg-fuzz-") as tmp:
            print("RESULT " + json.dumps(run_inside(args, Path(tmp))), flush=True)
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="converseg-fuzz-log-") as logs:
        env = loopback_env(args.domain_id, logs)
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = fenced([sys.executable, str(Path(__file__).resolve()), *argv, "--inside"])
        limit = 600 + args.soak_minutes * 60 * 1.5
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", file=sys.stderr)
        return 1
    result = json.loads(lines[-1][len("RESULT ") :])
    command = "python bench/bench_ros_fuzz.py " + " ".join(argv)
    (args.out_dir / "ros_fuzz.json").write_text(json.dumps(result, indent=1))
    text = report(result, args, command.strip())
    (args.out_dir / "ros_fuzz.md").write_text(text)
    print(text)
    ok = all(
        r["alive_after_fuzz"]
        and r["reference_unchanged"]
        and r["exit_code"] == 0
        and not r["tracebacks_in_log"]
        for r in (result["raw_node"], result["compressed_node"])
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
