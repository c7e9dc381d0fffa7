"""Scene -> render -> scene graph -> prompts -> masks -> verifier, for one process, and shard writing.

`Engine` holds the expensive state of a process (assets, MuJoCo model, GL context). `render_scene(i)`
depends only on (seed, scene index), so a dataset is the same whatever the number of workers or shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .render import configure_gl


@dataclass(frozen=True)
class EngineConfig:
    """What makes a dataset; stored in index.json so a run can be reproduced from its output."""

    seed: int = 0
    width: int = 512  # camera resolution of the training contract (ARCHITECTURE.md)
    height: int = 384
    min_objects: int = 3
    max_objects: int = 12
    copies: int = 2  # pool bodies per model: a scene holds at most this many of one model
    settle_steps: int = 60  # 0.24 s of simulated time: objects are dropped from 3 mm
    shadows: bool = True
    shadow_size: int = 1024
    negative_rate: float = 0.2
    samples_per_family: int = 1  # requests drawn per family and scene, before the verifier
    prompt_noise: float = 0.08  # share of requests with one human error (typo, dropped word, wrong plural)
    save_depth: bool = True
    sensor_effects: bool = True  # noise, blur, exposure, white balance, vignetting, JPEG on the RGB (sensor.py)


def add_request_options(parser, *, samples_per_family: int) -> None:
    """The command-line options of how requests are drawn, shared by the engine and by re-prompting."""
    parser.add_argument(
        "--samples-per-family",
        type=int,
        default=samples_per_family,
        help="requests drawn per concept family and scene",
    )
    parser.add_argument(
        "--negative-rate",
        type=float,
        default=EngineConfig.negative_rate,
        help="share of requests whose answer is absent",
    )
    parser.add_argument(
        "--prompt-noise",
        type=float,
        default=EngineConfig.prompt_noise,
        help="share of requests given one human error: a typo, a dropped small word, a wrong plural "
        "(never another object's name; 0 disables)",
    )


def config_digest(config: EngineConfig) -> str:
    """A short hash of everything that makes a dataset. Each shard's DONE marker carries it, so shards
    rendered by separate jobs are merged only when they were made with one configuration."""
    text = json.dumps(asdict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class SceneResult:
    scene_id: str
    rgb: np.ndarray
    depth: np.ndarray
    instance: np.ndarray
    graph: dict
    samples: list[tuple[dict, np.ndarray]]  # (jsonl record without paths, mask)
    rejected: dict


class Engine:
    """Per-process data engine. Build once (seconds), then render_scene many times."""

    def __init__(self, config: EngineConfig, *, asset_cache: Path | None = None):
        configure_gl()
        from .assets import build_asset_cache, load_assets
        from .knowledge import load_knowledge_base
        from .prompts import PromptGenerator
        from .render import SceneRenderer
        from .scene import TabletopWorld

        self.config = config
        self.kb = load_knowledge_base()
        folder = build_asset_cache(asset_cache, known_categories=set(self.kb.categories), log=lambda *_: None)
        self.assets = load_assets(folder)
        self.kb = self.kb.restricted_to(
            {a.category for a in self.assets}
        )  # categories with no model drop out
        self.world = TabletopWorld(
            assets=self.assets,
            kb=self.kb,
            copies=config.copies,
            width=config.width,
            height=config.height,
            shadow_size=config.shadow_size,
        )
        self.renderer = SceneRenderer(self.world, shadows=config.shadows)
        sizes = {}
        for a in self.assets:
            sizes.setdefault(a.category, (float(a.size_m[0]), float(a.size_m[1])))
        self.prompts = PromptGenerator(
            kb=self.kb,
            category_sizes=sizes,
            negative_rate=config.negative_rate,
            noise_rate=config.prompt_noise,
        )

    def render_scene(self, index: int) -> SceneResult:
        from .scene import sample_layout
        from .scene_graph import GRID, build_scene_graph, free_space_grid, grid_to_image, region_grid
        from .verifier import Verifier

        cfg = self.config
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index]))
        scene_id = f"s{cfg.seed:04d}_{index:07d}"
        layout = sample_layout(rng, self.world, min_objects=cfg.min_objects, max_objects=cfg.max_objects)
        for _ in range(3):  # drop what fell or interpenetrates, then settle the rest again
            self.world.apply(layout)
            penetration, bad = self.world.settle(cfg.settle_steps)
            if not bad or len(layout.placements) - len(bad) < 1:
                break
            layout = layout.without(bad)
        frame = self.renderer.render()
        if cfg.sensor_effects:
            from .sensor import apply_sensor_effects

            frame = apply_sensor_effects(frame, layout.sensor)
        graph = build_scene_graph(self.world, layout, frame, scene_id=scene_id)
        graph["max_penetration_m"] = round(penetration, 5)
        requests = self.prompts.generate(graph, rng, per_family=cfg.samples_per_family)
        verifier = Verifier()
        samples = []
        free, origin = free_space_grid(self.world, layout)
        for n, req in enumerate(requests):
            if req.answer_kind == "region":
                grid = free
                if req.region_safe_margin_m > 0:  # e.g. a knife: well away from the table edge
                    m = int(round(req.region_safe_margin_m / GRID))
                    inner = np.zeros_like(free)
                    inner[m:-m, m:-m] = True
                    grid = free & inner
                mask = grid_to_image(region_grid(grid, req.region_radius_m or 0.04), origin, frame)
            else:
                mask = object_mask(frame.instance, req.targets)
            reason = verifier.check(req, mask, graph, frame.instance)
            if reason is not None:
                continue
            samples.append((sample_record(req, graph, f"{scene_id}_{n:02d}", mask), mask))
        counts = dict(verifier.counts)
        counts.pop("kept", None)
        return SceneResult(scene_id, frame.rgb, frame.depth, frame.instance, graph, samples, counts)


# The fields of a samples.jsonl record that are file paths (relative to the shard).
PATH_KEYS = ("image", "mask_merged", "instances", "scene_graph", "depth")


def object_mask(instance: np.ndarray, targets: list[int]) -> np.ndarray:
    """The answer mask of an object request: the pixels of its target objects (none for a negative)."""
    return np.isin(instance, targets) if targets else np.zeros(instance.shape, bool)


def scene_files(scene_id: str, save_depth: bool) -> dict:
    """A scene's per-picture files, as record fields relative to its shard (PATH_KEYS but the mask)."""
    return {
        "image": f"images/{scene_id}.png",
        "instances": f"instances/{scene_id}.png",
        "scene_graph": f"scenes/{scene_id}.json",
        **({"depth": f"depth/{scene_id}.png"} if save_depth else {}),
    }


def read_instances(path: Path) -> np.ndarray:
    """An instance map written by write_scene -> H x W int32 object ids (-1: no object)."""
    return np.asarray(Image.open(path), dtype=np.int32) - 1


def read_index(folder: Path) -> dict:
    """A finished data engine output's index.json, or a DataEngineError saying what is wrong."""
    from .errors import DataEngineError

    path = folder / "index.json"
    if not path.is_file():
        raise DataEngineError(f"{folder}: no index.json; give a finished data engine output")
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != "converseg-dataengine":
        raise DataEngineError(f"{path}: not a data engine index (format {index.get('format')!r})")
    return index


def sample_record(req, graph: dict, sample_id: str, mask: np.ndarray) -> dict:
    """One kept request (prompts.Request) as its samples.jsonl record, without the file paths."""
    return {
        "prompt": req.prompt,
        "family": req.family,
        "template_id": req.template_id,
        "template_split": req.template_split,
        "concept": req.concept,
        "targets": req.targets,
        "target_categories": [graph["objects"][t]["category"] for t in req.targets],
        "negative": req.negative,
        **({"negative_kind": req.negative_kind} if req.negative else {}),
        "answer_kind": req.answer_kind,
        "scene_id": graph["scene_id"],
        "sample_id": sample_id,
        "mask_area": int(mask.sum()),
    }


def write_mask(mask: np.ndarray, shard_dir: Path, sample_id: str) -> str:
    """Write one sample's answer mask (mono8, 255 = answer); returns its path relative to the shard."""
    rel = f"masks/{sample_id}.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(shard_dir / rel, compress_level=1)
    return rel


def write_scene(res: SceneResult, shard_dir: Path, save_depth: bool) -> list[dict]:
    """Write the PNGs and the scene graph of one scene; return its jsonl records with paths filled in."""
    Image.fromarray(res.rgb).save(shard_dir / "images" / f"{res.scene_id}.png", compress_level=1)
    inst = (res.instance + 1).clip(0, 255).astype(np.uint8)  # 0 = no object, k + 1 = object id k (read_instances)
    Image.fromarray(inst).save(shard_dir / "instances" / f"{res.scene_id}.png", compress_level=1)
    if save_depth:
        mm = np.clip(res.depth * 1000.0, 0, 65535).astype(np.uint16)
        Image.fromarray(mm).save(shard_dir / "depth" / f"{res.scene_id}.png", compress_level=1)
    with open(shard_dir / "scenes" / f"{res.scene_id}.json", "w", encoding="utf-8") as f:
        json.dump(res.graph, f, separators=(",", ":"))
    out = []
    for rec, mask in res.samples:
        files = scene_files(res.scene_id, save_depth)
        mask_merged = write_mask(mask, shard_dir, rec["sample_id"])
        out.append({"image": files["image"], "mask_merged": mask_merged, **files, **rec})  # the field order of old shards
    return out


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def shard_tmp_glob(k: int) -> str:
    """Temporary folders of shard k, whichever process or machine writes them (see write_shard)."""
    return f".{shard_name(k)}.tmp-*"


def write_shard(engine: Engine, out: Path, shard: int, indices: list[int], progress=None) -> dict:
    """Render a shard into a temporary folder and rename it when complete (a crash leaves no DONE shard)."""
    final = out / shard_name(shard)
    if (final / "DONE").is_file():
        return json.loads((final / "DONE").read_text())
    # host and pid: array jobs on several machines share OUT, and pids repeat across machines
    tmp = out / f".{shard_name(shard)}.tmp-{socket.gethostname()}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    for sub in ("images", "masks", "scenes", "instances", "depth"):
        (tmp / sub).mkdir(parents=True)
    try:
        stats = _render_shard(engine, tmp, indices, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets its space back; Ctrl-C leaves no debris
        raise
    if final.exists():  # an incomplete leftover without DONE
        shutil.rmtree(final)
    os.replace(tmp, final)
    return stats


def _render_shard(engine: Engine, tmp: Path, indices: list[int], progress) -> dict:
    t0 = time.perf_counter()
    stats = {"scenes": 0, "samples": 0, "families": {}, "rejected": {}, "negatives": 0, "regions": 0}
    scene_times = []
    with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
        for i in indices:
            ts = time.perf_counter()
            res = engine.render_scene(i)
            for rec in write_scene(res, tmp, engine.config.save_depth):
                f.write(json.dumps(rec) + "\n")
                stats["samples"] += 1
                stats["families"][rec["family"]] = stats["families"].get(rec["family"], 0) + 1
                stats["negatives"] += int(rec["negative"])
                stats["regions"] += int(rec["answer_kind"] == "region")
            for k, v in res.rejected.items():
                stats["rejected"][k] = stats["rejected"].get(k, 0) + v
            stats["scenes"] += 1
            scene_times.append(time.perf_counter() - ts)
            if progress is not None:
                progress(1)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["median_scene_s"] = round(float(np.median(scene_times)), 4) if scene_times else None
    stats["indices"] = [indices[0], indices[-1]] if indices else []
    stats["config_sha256"] = config_digest(engine.config)
    (tmp / "DONE").write_text(json.dumps(stats))
    return stats


# Pool workers (a process pool or a Ray pool, executors.py) live here, not in __main__: spawned children
# and Ray actors import this module by name.
_ENGINE: Engine | None = None
_PROGRESS = None
_INIT_ERROR: str | None = None


def init_worker(cfg: EngineConfig, asset_cache, progress_queue) -> None:
    # An exception escaping a pool initializer kills the worker and the pool respawns it forever; keep the
    # error and raise it from the first task instead, so the run fails with the message.
    global _ENGINE, _PROGRESS, _INIT_ERROR
    # Ctrl-C reaches every process of the terminal's group: the parent stops the pool and says how to resume;
    # the workers stay quiet instead of each printing a KeyboardInterrupt traceback.
    # (A Ray pool actor may run this outside the main thread, where signals cannot be set: Ray's workers
    # are not in the terminal's process group anyway.)
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _PROGRESS = progress_queue
    # One llvmpipe render thread per worker: the pool already keeps every core busy, and extra GL threads
    # only add switching (measured ~15 % less CPU per scene). A user's own setting wins.
    os.environ.setdefault("LP_NUM_THREADS", "1")
    try:
        _ENGINE = Engine(cfg, asset_cache=asset_cache)
    except Exception as exc:
        _INIT_ERROR = f"{type(exc).__name__}: {exc}"


def run_shard(out: str, shard: int, indices: list[int]) -> dict:
    if _INIT_ERROR is not None:
        from .errors import DataEngineError

        raise DataEngineError(f"a worker could not start: {_INIT_ERROR}")
    return write_shard(_ENGINE, Path(out), shard, indices, progress=_PROGRESS.put)
