#!/usr/bin/env bash
# Builds the authors' environment for benchmarks/bench_vs_authors.py: a venv in which the DS2D2
# authors' MMDetection 3.3 fork (PolarAid/DS2D2, which provides `mmdet`) and this project's
# `ds2d2_cli` import in one interpreter, so both training steps can be timed side by side.
#
#   benchmarks/authors_env.sh [TARGET] [DS2D2_SRC]
#
#   TARGET     the venv to create (default /work/mmenv); it must not exist yet
#   DS2D2_SRC  a local git dir (bare, e.g. a mirror) or checkout of PolarAid/DS2D2 (or env
#              DS2D2_SRC). Nothing is downloaded from GitHub: there is no internet here, only the
#              package registries, so the fork's source must already be on this machine.
#   env DS2D2_COMMIT   the fork's commit to check out (default 6cce4ad8..., the one this project was
#                      checked against; the source's HEAD when that commit is not in it)
#   env NICE_LEVEL     niceness of the pip steps and the compile (default 19)
#
# What it does, and why:
# - the venv does not get its own torch: a .pth file puts the project venv's site-packages
#   (.venv, `make setup`: torch 2.14.1 / torchvision 0.29.1) on its path, after its own, so the
#   very same torch is used; a second .pth puts this checkout on the path (`import ds2d2_cli`).
#   pip never touches .venv (it does not uninstall outside its own prefix).
# - setuptools 80.9 in the venv (shadowing .venv's 84): mmcv 2.1.0's setup.py imports
#   pkg_resources, which setuptools >= 81 no longer ships; torch 2.14 needs setuptools >= 77.0.3.
# - mmcv 2.1.0 has no wheel for this torch: it is compiled from its PyPI sdist with its C++ CPU ops
#   (MMCV_WITH_OPS=1, FORCE_CUDA=0), --no-build-isolation against the shared torch. One patch:
#   setup.py passes -std=c++17, torch 2.14's headers need C++20. Takes ~35-40 min on 2 busy cores.
# - mmengine 0.10.7, pytorch_wavelets and the fork's other runtime needs, pinned to the versions
#   that worked (numpy, pycocotools, shapely, matplotlib, Pillow come from .venv).
# - the fork is cloned to TARGET/DS2D2 and installed editable, without its dependencies.
# - TARGET/PATCHES.md records all this (with the fork's commit); TARGET/verify.py checks it.
#
# Needs: the project's .venv (make setup), g++ with C++20 (GCC >= 10), git.
set -euo pipefail

PROJECT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${1:-/work/mmenv}"
DS2D2_SRC="${2:-${DS2D2_SRC:-}}"
DS2D2_COMMIT="${DS2D2_COMMIT:-6cce4ad8732f32cad7f3659700f91f05f2a9c0c7}"
NICE=(nice -n "${NICE_LEVEL:-19}")
MMCV_VERSION=2.1.0

die() { echo "authors_env: $*" >&2; exit 1; }
[ -n "$DS2D2_SRC" ] || die "give the DS2D2 source (a local git dir or checkout of PolarAid/DS2D2) as \$2 or DS2D2_SRC"
git -C "$DS2D2_SRC" rev-parse --git-dir >/dev/null 2>&1 || die "$DS2D2_SRC is not a git dir or checkout"
[ -x "$PROJECT/.venv/bin/python" ] || die "no $PROJECT/.venv: run make setup first"
[ ! -e "$TARGET" ] || die "$TARGET exists: remove it or give another target"
DS2D2_SRC="$(cd "$DS2D2_SRC" && pwd)"

VENV_PY="$PROJECT/.venv/bin/python"
BASE_PY="${PYTHON:-$("$VENV_PY" -c 'import sys; print(sys._base_executable)')}"
VENV_SITE="$("$VENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$VENV_PY" -c 'import torch, torchvision' || die "torch/torchvision do not import in $PROJECT/.venv"

log() { echo "[authors_env $(date +%H:%M:%S)] $*"; }
start=$(date +%s)

# 1. the venv, sharing the project's torch and seeing the project
log "venv $TARGET from $BASE_PY, sharing $VENV_SITE"
"$BASE_PY" -m venv "$TARGET"
PY="$TARGET/bin/python"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$VENV_SITE" > "$SITE/zz_main_venv.pth"
echo "$PROJECT" > "$SITE/zz_ds2d2_cli.pth"
mkdir -p "$TARGET/src"
CONSTRAINTS="$TARGET/src/constraints.txt"
{
    cat "$PROJECT/constraints.txt"
    cat <<'EOF'
# the authors' environment, as built and checked
pip==26.3
setuptools==80.9.0
wheel==0.48.0
mmengine==0.10.7
opencv-python==5.1.0.95
yapf==0.43.0
addict==2.4.0
termcolor==3.3.0
platformdirs==4.14.9
pytorch_wavelets==1.3.0
scipy==1.17.1
six==1.17.0
terminaltables==3.1.10
tqdm==4.70.1
EOF
} > "$CONSTRAINTS"
PIP=("${NICE[@]}" "$PY" -m pip)
"${PIP[@]}" install -q -c "$CONSTRAINTS" --upgrade pip setuptools wheel
"$PY" -c 'import torch; assert torch.__version__.startswith("2.14.1"), torch.__version__'

# 2. mmcv's and mmdet's pure-Python needs
log "mmengine, pytorch_wavelets and the fork's runtime needs"
"${PIP[@]}" install -q -c "$CONSTRAINTS" mmengine pytorch_wavelets scipy six terminaltables tqdm

# 3. mmcv from its sdist, C++ CPU ops, -std=c++20
log "mmcv $MMCV_VERSION sdist"
cd "$TARGET/src"
"${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation "mmcv==$MMCV_VERSION" -d .
tar xzf "mmcv-$MMCV_VERSION.tar.gz"
cd "mmcv-$MMCV_VERSION"
cp setup.py setup.py.orig
sed -i "s/extra_compile_args\['cxx'\] = \['-std=c++17'\]/extra_compile_args['cxx'] = ['-std=c++20']/" setup.py
diff -u setup.py.orig setup.py > "../mmcv-$MMCV_VERSION-cxx20.patch" && die "the -std=c++17 -> c++20 patch did not apply"
log "compiling mmcv (log: $TARGET/src/mmcv-build.log)"
t0=$(date +%s)
MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
    "${PIP[@]}" install -v --no-build-isolation -c "$CONSTRAINTS" . > "$TARGET/src/mmcv-build.log" 2>&1 \
    || { tail -40 "$TARGET/src/mmcv-build.log"; die "mmcv build failed"; }
mmcv_min=$(( ($(date +%s) - t0) / 60 ))
log "mmcv built in ${mmcv_min} min"
cd "$TARGET"
"$PY" -c 'from mmcv.ops import RoIAlign, nms'

# 4. the authors' fork, editable
log "DS2D2 from $DS2D2_SRC"
git clone -q --no-checkout "$DS2D2_SRC" "$TARGET/DS2D2"
cd "$TARGET/DS2D2"
if git cat-file -e "$DS2D2_COMMIT^{commit}" 2>/dev/null; then
    commit="$(git rev-parse "$DS2D2_COMMIT^{commit}")"
else
    commit="$(git rev-parse HEAD)"
    log "commit $DS2D2_COMMIT not in the source: using its HEAD $commit"
fi
# a mirror may lack its largest blobs (here demo/MMDet_Tutorial.ipynb): leave those out of the checkout
missing=()
while IFS=$'\t' read -r meta path; do
    sha="${meta##* }"
    git cat-file -e "$sha" 2>/dev/null || missing+=("$path")
done < <(git ls-tree -r "$commit")
if [ "${#missing[@]}" -gt 0 ]; then
    log "blobs missing from the source, left out of the checkout: ${missing[*]} (git still prints" \
        "'error: invalid object' for them: harmless, the checkout succeeds)"
    git sparse-checkout set --no-cone '/*' "${missing[@]/#/!/}"
fi
git checkout -q --detach "$commit"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e "$TARGET/DS2D2"
cd "$TARGET"

# 5. notes and the check
cat > "$TARGET/PATCHES.md" <<EOF
# The authors' environment ($TARGET)

Built by \`benchmarks/authors_env.sh\` of ds2d2 ($PROJECT) on $(date -u +%Y-%m-%d), in $(( ($(date +%s) - start) / 60 )) min.

DS2D2 commit: $commit
(the fork PolarAid/DS2D2, cloned from $DS2D2_SRC to $TARGET/DS2D2 at commit $commit, installed with
\`pip install --no-deps --no-build-isolation -e\`; unmodified.$( [ "${#missing[@]}" -gt 0 ] && echo " Left out of the checkout, missing from the source: ${missing[*]}." ))

- python: $("$PY" -c 'import sys; print(sys.version.split()[0])') (venv from $BASE_PY)
- torch $("$PY" -c 'import torch; print(torch.__version__)'), torchvision $("$PY" -c 'import torchvision; print(torchvision.__version__)'): not installed here but shared from $VENV_SITE
  (\`zz_main_venv.pth\` in site-packages, after the venv's own packages); \`zz_ds2d2_cli.pth\` puts $PROJECT on the path
- setuptools 80.9.0 in the venv: mmcv 2.1.0's setup.py imports pkg_resources (gone from setuptools >= 81)
- mmcv $MMCV_VERSION compiled from the PyPI sdist with its C++ CPU ops (MMCV_WITH_OPS=1 FORCE_CUDA=0
  MAX_JOBS=${MAX_JOBS:-2}, \`pip install --no-build-isolation\`), in ${mmcv_min} min. Patch (torch 2.14 headers need C++20):

\`\`\`diff
$(cat "$TARGET/src/mmcv-$MMCV_VERSION-cxx20.patch")
\`\`\`

- pinned (with the project's constraints.txt): $TARGET/src/constraints.txt

\`\`\`
$("$PY" -m pip freeze --path "$SITE" 2>/dev/null)
\`\`\`

Check: \`$PY $TARGET/verify.py\` prints OK.
EOF

cat > "$TARGET/verify.py" <<'EOF'
"""Check the authors' environment: mmcv (with its compiled CPU ops), mmengine, the DS2D2 fork's mmdet
and its two distillers, and ds2d2_cli all import in this one interpreter; a tiny nms and RoIAlign run
on CPU tensors. Prints OK (exit 0) or raises."""

import importlib

import torch

mods = {}
for name in ("mmcv", "mmcv.ops", "mmengine", "mmdet", "mmdet.models.distillation.ds2d2_retinanet",
             "mmdet.models.distillation.ds2d2_faster_rcnn", "ds2d2_cli"):
    mods[name] = importlib.import_module(name)

from mmcv.ops import RoIAlign, nms  # noqa: E402  the compiled extension (mmcv._ext)

assert mods["mmcv"].__version__ == "2.1.0", mods["mmcv"].__version__

# nms: the second box overlaps the first (IoU 0.68) and is dropped; the third is kept
boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0]])
scores = torch.tensor([0.9, 0.8, 0.7])
dets, keep = nms(boxes, scores, iou_threshold=0.5)
assert keep.tolist() == [0, 2], keep
assert dets.shape == (2, 5), dets.shape

# RoIAlign: a constant map pools to that constant; over the whole 4x4 ramp (aligned) to its mean, 7.5
feat = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 2, 1, 1)
rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0], [0.0, 1.0, 1.0, 3.0, 3.0]])
out = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True)(feat, rois)
assert out.shape == (2, 2, 2, 2), out.shape
assert torch.isfinite(out).all()
assert abs(float(out[0].mean()) - 7.5) < 1e-4, out[0]
const = RoIAlign((2, 2), 1.0, 2, aligned=True)(torch.full((1, 3, 8, 8), 5.0), rois)
assert torch.allclose(const, torch.full_like(const, 5.0)), const

print(f"torch {torch.__version__}, mmcv {mods['mmcv'].__version__}, mmengine {mods['mmengine'].__version__}, "
      f"mmdet {mods['mmdet'].__version__} ({mods['mmdet'].__file__}), ds2d2_cli {mods['ds2d2_cli'].__file__}")
print("OK")
EOF

log "verify"
"$PY" "$TARGET/verify.py"
log "done in $(( ($(date +%s) - start) / 60 )) min: $PY benchmarks/bench_vs_authors.py --quick"
