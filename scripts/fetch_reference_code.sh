#!/usr/bin/env bash
# Fetches official reference source that tests compare our modules against, into .cache/reference/
# (gitignored; nothing here is committed or imported by the package).
#
# mobile_sam/modeling/tiny_vit_sam.py: MobileSAM's TinyViT (Apache-2.0, Copyright (c) 2022 Microsoft and
# the MobileSAM authors), taken from the `mobilesam-mirror` wheel on PyPI, a packaging of the MobileSAM
# repository. Only that file and the licence are kept; the wheel is never installed (it would want timm).
# The sha256 pins the exact file the tests were written against. Safe to run again; exits non-zero with a
# message when the download or the check fails.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
DEST=.cache/reference
FILE=$DEST/mobile_sam/tiny_vit_sam.py
SHA256=e6432ce8eee4727e921ab5b0530631fd71453f760247734f8fe63604cff4d303

if [ -f "$FILE" ] && echo "$SHA256  $FILE" | sha256sum -c --status; then
  echo "[fetch_reference_code] $FILE already present"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! "$PY" -m pip download -q --no-deps --only-binary=:all: mobilesam-mirror==1.0.0 -d "$tmp"; then
  echo "[fetch_reference_code] could not download mobilesam-mirror==1.0.0 from PyPI" >&2
  exit 1
fi
mkdir -p "$DEST/mobile_sam"
"$PY" - "$tmp" "$DEST/mobile_sam" <<'PYEOF'
import glob
import sys
import zipfile

src, dest = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(f"{src}/mobilesam_mirror-1.0.0-*.whl")
with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    (licence,) = [n for n in names if n.endswith("LICENSE")]
    for member, target in [("mobile_sam/modeling/tiny_vit_sam.py", "tiny_vit_sam.py"), (licence, "LICENSE")]:
        with zf.open(member) as f, open(f"{dest}/{target}", "wb") as out:
            out.write(f.read())
PYEOF
if ! grep -q "Apache License" "$DEST/mobile_sam/LICENSE"; then
  echo "[fetch_reference_code] the wheel's licence is not Apache-2.0: refusing to use it" >&2
  exit 1
fi
if ! echo "$SHA256  $FILE" | sha256sum -c --status; then
  echo "[fetch_reference_code] $FILE does not match the pinned sha256 $SHA256" >&2
  rm -f "$FILE"
  exit 1
fi
echo "[fetch_reference_code] wrote $FILE"
