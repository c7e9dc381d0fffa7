"""Headless rendering of the robot camera: RGB, per-object instance ids and metric depth."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


def configure_gl() -> str:
    """Choose the OpenGL backend before mujoco is imported: MUJOCO_GL if set, else EGL, else OSMesa."""
    if "MUJOCO_GL" in os.environ:
        return os.environ["MUJOCO_GL"]
    backend = "egl"
    try:
        import ctypes

        ctypes.CDLL("libEGL.so.1")
    except OSError:
        backend = "osmesa"
    os.environ["MUJOCO_GL"] = backend
    if backend == "osmesa":
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    return backend


@dataclass
class Frame:
    """One rendered view.

    rgb: H x W x 3 uint8; instance: H x W int32 (-1 background/table, else index into the layout's
    placements); table: H x W bool (table top visible); depth: H x W float32 metres along the optical
    axis; K: 3 x 3 intrinsics (pixels); cam_pos: 3 (world, m); cam_rot: 3 x 3 world-from-camera with
    columns right, down, forward (OpenCV convention).
    """

    rgb: np.ndarray
    instance: np.ndarray
    table: np.ndarray
    depth: np.ndarray
    K: np.ndarray
    cam_pos: np.ndarray
    cam_rot: np.ndarray


class SceneRenderer:
    """Wraps mujoco.Renderer; created once per process (the GL context and textures are uploaded once)."""

    def __init__(self, world, *, shadows: bool = True):
        import mujoco

        self._mj = mujoco
        self.world = world
        self.renderer = mujoco.Renderer(world.model, height=world.height, width=world.width)
        self.opt = mujoco.MjvOption()
        self.opt.geomgroup[:] = [1, 1, 1, 0, 0, 0]
        self.shadows = shadows

    def render(self) -> Frame:
        mj, w, r = self._mj, self.world, self.renderer
        r.update_scene(w.data, camera=w.camera, scene_option=self.opt)
        r.scene.flags[mj.mjtRndFlag.mjRND_SHADOW] = self.shadows
        rgb = r.render().copy()
        r.scene.flags[mj.mjtRndFlag.mjRND_SHADOW] = False  # ids and depth need no shadows
        r.enable_segmentation_rendering()
        seg = r.render()
        r.disable_segmentation_rendering()
        r.enable_depth_rendering()
        depth = r.render().astype(np.float32)
        r.disable_depth_rendering()
        geom = seg[..., 0].astype(np.int64)
        is_geom = (seg[..., 1] == int(mj.mjtObj.mjOBJ_GEOM)) & (geom >= 0)
        owner = np.full(geom.shape, -1, dtype=np.int64)
        owner[is_geom] = w.geom_owner[geom[is_geom]]
        # pool index -> placement index
        lut = {p.model_index * w.copies + p.copy: k for k, p in enumerate(w.active)}
        instance = np.full(geom.shape, -1, dtype=np.int32)
        for pool, k in lut.items():
            instance[owner == pool] = k
        table = is_geom & (geom == w.table_geom)
        m = w.model
        cam = w.camera
        fovy = np.radians(m.cam_fovy[cam])
        f = 0.5 * w.height / np.tan(fovy / 2)
        K = np.array([[f, 0, w.width / 2], [0, f, w.height / 2], [0, 0, 1]])
        xmat = w.data.cam_xmat[cam].reshape(3, 3)
        cam_rot = xmat @ np.diag([1.0, -1.0, -1.0])  # MuJoCo camera (x right, y up, -z fwd) -> OpenCV
        return Frame(rgb, instance, table, depth, K, w.data.cam_xpos[cam].copy(), cam_rot)

    def close(self) -> None:
        self.renderer.close()
