#!/bin/sh
# Container entrypoint: source ROS 2 and the converseg_ros overlay, make sure TensorRT engines for THIS GPU
# exist in $CONVERSEG_ENGINE_DIR (building them on first start), then run the command (default: the launch
# file with backend:=tensorrt). Engines from another GPU or TensorRT version are rebuilt, not used.
#
#   CONVERSEG_ENGINE_DIR   engine folder, a mounted volume          (default /engines)
#   CONVERSEG_ONNX_DIR     ONNX export folder from export_onnx.py   (default /models/onnx_edge)
#   CONVERSEG_PRECISION    fp32 | fp16 | int8                       (default fp16)
#   CONVERSEG_CALIB_IMAGES folder of camera frames, needed for int8
#   CONVERSEG_SKIP_ENGINES=1  skip the engine step (other backends, or a camera-only container)
#   CONVERSEG_CACHE        the phrasing memory's embeddings (request anchoring), kept in the volume
#                          (the images set /engines/cache)
set -eu

# ROS setup scripts read unset variables; relax -u while sourcing them.
set +u
. "/opt/ros/${ROS_DISTRO:-humble}/setup.sh"
. /opt/converseg_ws/install/setup.sh
set -u

ENGINE_DIR=${CONVERSEG_ENGINE_DIR:-/engines}
ONNX_DIR=${CONVERSEG_ONNX_DIR:-/models/onnx_edge}
PRECISION=${CONVERSEG_PRECISION:-fp16}

engines_usable() {
    # Loading runs the side-file check (TensorRT version, GPU name, compute capability, checksums).
    [ -f "$ENGINE_DIR/engines.json" ] || return 1
    python3 -c 'import sys; from converseg_core.backends import get_backend; get_backend("tensorrt", sys.argv[1])' \
        "$ENGINE_DIR"
}

if [ "${CONVERSEG_SKIP_ENGINES:-0}" != "1" ] && ! engines_usable; then
    if [ ! -f "$ONNX_DIR/manifest.json" ]; then
        echo "converseg: no usable TensorRT engines in $ENGINE_DIR and no ONNX export in $ONNX_DIR." >&2
        echo "converseg: export one on a workstation (python export/export_onnx.py --checkpoint CKPT --out models/onnx_edge)" >&2
        echo "converseg: and mount it at $ONNX_DIR (docker/compose.yaml mounts ../models at /models)." >&2
        exit 1
    fi
    echo "converseg: building $PRECISION TensorRT engines for this GPU into $ENGINE_DIR (first start: minutes)"
    if [ "$PRECISION" = "int8" ]; then
        converseg-build-trt --onnx-dir "$ONNX_DIR" --out "$ENGINE_DIR" \
            --precision int8 --calib-images "${CONVERSEG_CALIB_IMAGES:?int8 needs CONVERSEG_CALIB_IMAGES}"
    else
        converseg-build-trt --onnx-dir "$ONNX_DIR" --out "$ENGINE_DIR" --precision "$PRECISION"
    fi
fi

exec "$@"
