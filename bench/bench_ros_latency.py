"""Camera-to-mask latency, staleness and memory of the segment node over real ROS 2 (loopback only).

    python bench/bench_ros_latency.py --model converseg_edge --seconds 60 --out bench/out/ros.md

Two phases against one segment node process, frames of --width x --height rgb8 stamped at publish time:
1. latency: one frame at a time, the next sent 50-100 ms after the previous mask arrived, so the node is idle
   when a frame comes in. camera-to-mask = mask received by this process - frame stamp; overhead =
   camera-to-mask - the node's model time for that frame (Segmenter.set_image + predict).
   Target: median overhead <= 10 ms.
2. stream: a --rate-hz camera for --seconds. Reports how old each mask is when it arrives, how long its frame
   waited in the node's mailbox compared with one model interval (the inference running when it came in),
   frames dropped, and the node's resident memory over time (slope of a least-squares line).

SAFETY: runs itself inside `unshare -rn` (only loopback) where possible, always with
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and its own ROS_DOMAIN_ID (converseg_ros.loopback).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "converseg_ros"))  # until pyproject maps converseg_ros (editable install)

sys.path.append(str(REPO))  # bench.machine
from converseg_ros.loopback import fenced, loopback_env, unshare_works  # noqa: E402

from bench.machine import cpu_description, rss_mb, slope_per_min  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="converseg_edge", help="registered variant, RANDOM weights")
    source.add_argument("--model-path", default=None, help="checkpoint or exported folder (with --backend)")
    parser.add_argument(
        "--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch", help="backend"
    )
    parser.add_argument(
        "--img-size", type=int, default=0, help="network input side for --model (0 = its own)"
    )
    parser.add_argument("--width", type=int, default=640, help="frame width")
    parser.add_argument("--height", type=int, default=480, help="frame height")
    parser.add_argument("--latency-frames", type=int, default=40, help="frames in the latency phase")
    parser.add_argument("--rate-hz", type=float, default=30.0, help="camera rate of the stream phase")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the stream phase")
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads of the node")
    parser.add_argument("--domain-id", type=int, default=71, help="ROS_DOMAIN_ID (distinct per run)")
    parser.add_argument("--out", type=Path, default=None, help="write a Markdown report here")
    parser.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    return parser


# ----------------------------------------------------------------------------------------------------- inside


def run_inside(args: argparse.Namespace, tmp: Path) -> dict:
    import rclpy
    from converseg_ros.demo_scene import synthetic_frames
    from converseg_ros.image_conversion import rgb_to_image_fields
    from converseg_ros.launch_plan import params_file_text
    from converseg_ros.segment_node import IMAGE_TOPIC, OUTPUT_QOS, QUERY_QOS
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    params = {"diagnostics_period": 1.0, "backend": args.backend, "publish_overlay": False}
    if args.model_path:
        params["model_path"] = args.model_path
    else:
        params |= {"random_model": args.model, "random_model_img_size": args.img_size}
    (tmp / "node.yaml").write_text(params_file_text("/**", params))
    log = open(tmp / "node.log", "w")  # noqa: SIM115 - lives as long as the node
    node_proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "converseg_ros.segment_node",
            "--ros-args",
            "--params-file",
            str(tmp / "node.yaml"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    rclpy.init()
    node = rclpy.create_node("converseg_bench")
    image_pub = node.create_publisher(Image, IMAGE_TOPIC, qos_profile_sensor_data)
    query_pub = node.create_publisher(String, "/converseg/query", QUERY_QOS["latched"])
    masks: dict[str, float] = {}  # frame_id -> receive time (ns)
    results: dict[str, dict] = {}
    node.create_subscription(
        Image, "/converseg/mask", lambda m: masks.setdefault(m.header.frame_id, time.time_ns()), OUTPUT_QOS
    )
    node.create_subscription(
        String,
        "/converseg/result",
        lambda m: (d := json.loads(m.data), results.setdefault(d["frame_id"], d)),
        OUTPUT_QOS,
    )
    frame = Image(**rgb_to_image_fields(synthetic_frames(args.width, args.height, count=1)[0], "rgb8"))
    sent: dict[str, int] = {}

    def publish(frame_id: str) -> None:
        now = time.time_ns()
        frame.header.stamp.sec, frame.header.stamp.nanosec = now // 10**9, now % 10**9
        frame.header.frame_id = frame_id
        sent[frame_id] = now
        image_pub.publish(frame)

    # Receive on a spinning executor thread so that arrival times are taken when a message lands, not when
    # a polling loop gets round to it; the main thread publishes and waits.
    executor = rclpy.executors.SingleThreadedExecutor()
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()

    def spin_until(predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not predicate():
            time.sleep(0.0005)
        return predicate()

    try:
        assert spin_until(lambda: query_pub.get_subscription_count() > 0, 120), (tmp / "node.log").read_text()
        query_pub.publish(String(data="the red mug"))
        # Warm-up: the first inferences allocate and tune.
        for i in range(5):
            publish(f"warm{i}")
            assert spin_until(lambda i=i: f"warm{i}" in results, 60), (tmp / "node.log").read_text()

        # Phase 1: latency with an idle node.
        latency = []
        for i in range(args.latency_frames):
            spin_until(lambda: False, random.uniform(0.05, 0.1))
            fid = f"lat{i}"
            publish(fid)
            if spin_until(lambda fid=fid: fid in masks and fid in results, 30):
                d = results[fid]
                total = (masks[fid] - sent[fid]) / 1e6
                latency.append(dict(total=total, node=d["latency_ms"]["camera_to_mask"], **d["latency_ms"]))

        # Phase 2: a camera at rate_hz.
        period = 1.0 / args.rate_hz
        memory = []
        start = time.monotonic()
        n = 0
        next_rss = start
        while time.monotonic() - start < args.seconds:
            n += 1
            publish(f"s{n}")
            if time.monotonic() >= next_rss:
                memory.append((time.monotonic() - start, rss_mb(node_proc.pid)))
                next_rss += 1.0
            spin_until(lambda: False, max(0.0, start + n * period - time.monotonic()))
        spin_until(lambda: False, 2.0)
        stream_ids = [f"s{i}" for i in range(1, n + 1)]
        done = [f for f in stream_ids if f in masks and f in results]
        order = sorted(done, key=lambda f: masks[f])
        ages = [(masks[f] - sent[f]) / 1e6 for f in done]
        # A frame that arrives while the worker is busy waits at most until the worker's next take, i.e. one
        # model interval: the worker cycle that produced the previous mask, measured between mask arrivals.
        waits = []
        for before, prev, cur in zip(order, order[1:], order[2:], strict=False):
            c = results[cur]["latency_ms"]
            own = c["convert"] + c["model"] + c["postprocess"]
            waits.append(dict(queue=c["queue"], interval=(masks[prev] - masks[before]) / 1e6,
                              excess_age=(masks[cur] - sent[cur]) / 1e6 - own))  # fmt: skip
    finally:
        node_proc.send_signal(2)
        try:
            rc = node_proc.wait(15)
        except subprocess.TimeoutExpired:
            node_proc.kill()
            rc = "killed"
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return dict(latency=latency, stream=dict(sent=n, masks=len(done), ages_ms=ages, waits=waits,
                memory=memory, seconds=args.seconds, rate_hz=args.rate_hz), node_rc=rc)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- outside
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(raw: dict, args: argparse.Namespace) -> dict:
    lat = raw["latency"]
    overhead = [r["total"] - r["model"] for r in lat]
    stream = raw["stream"]
    waits = stream["waits"]
    mem = stream["memory"]
    settled = [p for p in mem if p[0] >= min(10.0, args.seconds / 3)]
    return {
        "latency_frames": len(lat),
        "camera_to_mask_ms_median": median([r["total"] for r in lat]),
        "model_ms_median": median([r["model"] for r in lat]),
        "overhead_ms_median": median(overhead),
        "overhead_ms_p90": sorted(overhead)[int(0.9 * (len(overhead) - 1))] if overhead else float("nan"),
        "node_stamp_to_publish_ms_median": median([r["node"] for r in lat]),
        "in_transport_ms_median": median([r["node"] - r["pipeline"] for r in lat]),
        "queue_ms_median": median([r["queue"] for r in lat]),
        "convert_ms_median": median([r["convert"] for r in lat]),
        "postprocess_ms_median": median([r["postprocess"] for r in lat]),
        "out_transport_ms_median": median([r["total"] - r["node"] for r in lat]),
        "stream_sent": stream["sent"],
        "stream_masks": stream["masks"],
        "stream_mask_age_ms_median": median(stream["ages_ms"]),
        "stream_mask_age_ms_max": max(stream["ages_ms"], default=float("nan")),
        "stream_queue_ms_max": max((w["queue"] for w in waits), default=float("nan")),
        "stream_queue_over_interval_max": max(
            (w["queue"] / w["interval"] for w in waits), default=float("nan")
        ),
        "stream_excess_over_interval_max": max(
            (w["excess_age"] / w["interval"] for w in waits), default=float("nan")
        ),
        "stream_excess_over_interval_share_above_1": (
            sum(w["excess_age"] > w["interval"] for w in waits) / len(waits) if waits else float("nan")
        ),
        "stream_model_interval_ms_median": median([w["interval"] for w in waits]),
        "stream_excess_age_ms_max": max((w["excess_age"] for w in waits), default=float("nan")),
        "rss_mb_first": mem[0][1] if mem else float("nan"),
        "rss_mb_after_warmup": settled[0][1] if settled else float("nan"),
        "rss_mb_last": mem[-1][1] if mem else float("nan"),
        "rss_mb_per_min_after_warmup": slope_per_min(settled),
        "node_exit_code": raw["node_rc"],
    }


def report(summary: dict, args: argparse.Namespace, command: str) -> str:
    s = summary
    cpu = cpu_description()
    model = args.model_path or f"{args.model} (random weights, img_size {args.img_size or 'default'})"
    return f"""# ROS 2 node benchmarks (bench/bench_ros_latency.py)

- Machine: {cpu}; {platform.platform()}; Python {platform.python_version()}; no GPU.
  Shared with other jobs: numbers are indicative, medians over the runs below.
- Date: {dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- Command: `{command}`
- Model: {model}, backend {args.backend}, {args.threads} thread(s); frames {args.width}x{args.height} rgb8;
  ROS 2 Kilted wheels (rclpy, Fast DDS with the bundled 16 MiB shared-memory profile), loopback only
  (`unshare -rn`: {unshare_works()}).

## Camera-to-mask latency, node idle when a frame arrives ({s["latency_frames"]} frames)

| | median |
|---|---|
| camera-to-mask (frame stamp to mask received by a subscriber) | {s["camera_to_mask_ms_median"]:.1f} ms |
| model (Segmenter.set_image + predict, as timed by the node) | {s["model_ms_median"]:.1f} ms |
| **overhead = camera-to-mask - model** (target <= 10 ms) | **{s["overhead_ms_median"]:.1f} ms** (p90 {s["overhead_ms_p90"]:.1f} ms) |
| frame stamp to mask publish, inside the node | {s["node_stamp_to_publish_ms_median"]:.1f} ms |

Where the overhead goes (medians): frame transport and deserialization into the node
{s["in_transport_ms_median"]:.1f} ms, mailbox wait {s["queue_ms_median"]:.1f} ms, conversion {s["convert_ms_median"]:.1f} ms,
label image {s["postprocess_ms_median"]:.1f} ms, mask message and transport to the subscriber {s["out_transport_ms_median"]:.1f} ms.

## {args.rate_hz:g} Hz camera for {args.seconds:g} s

| | value |
|---|---|
| frames sent / masks published | {s["stream_sent"]} / {s["stream_masks"]} (the rest dropped as stale, by design) |
| mask age when received, median / max | {s["stream_mask_age_ms_median"]:.1f} / {s["stream_mask_age_ms_max"]:.1f} ms |
| model interval (time between masks), median | {s["stream_model_interval_ms_median"]:.1f} ms |
| longest wait of a frame in the node's mailbox | {s["stream_queue_ms_max"]:.1f} ms = {s["stream_queue_over_interval_max"]:.2f} x the model interval it waited through |
| mask age minus its own processing (= how old its frame was when inference started, transport included), max | {s["stream_excess_age_ms_max"]:.1f} ms = {s["stream_excess_over_interval_max"]:.2f} x the model interval (target <= 1); above 1 for {100 * s["stream_excess_over_interval_share_above_1"]:.1f} % of masks |
| node resident memory: start / after warm-up / end | {s["rss_mb_first"]:.0f} / {s["rss_mb_after_warmup"]:.0f} / {s["rss_mb_last"]:.0f} MB |
| memory slope after warm-up (least squares) | {s["rss_mb_per_min_after_warmup"]:+.2f} MB/min |
| node exit code after SIGINT | {s["node_exit_code"]} |
"""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.inside:
        tmp = Path(tempfile.mkdtemp(prefix="converseg-bench-"))
        print("RESULT " + json.dumps(run_inside(args, tmp)), flush=True)
        return 0
    command = "python bench/bench_ros_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="converseg-bench-") as tmp:
        env = loopback_env(args.domain_id, Path(tmp) / "ros_log")
        env["OMP_NUM_THREADS"] = str(args.threads)
        cmd = fenced([sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:]), "--inside"])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((x for x in reversed(done.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if line is None:
        print(
            f"benchmark failed (rc={done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}",
            file=sys.stderr,
        )
        return 1
    raw = json.loads(line[len("RESULT ") :])
    summary = summarize(raw, args)
    text = report(summary, args, command)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "raw": raw}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
