#!/usr/bin/env bash
# Runs every test: installs what the tests need (Debian packages, the package itself with the
# fastrouter), the C++ unit tests, sanitizer builds of the router, ruff, the pytest suite, and
# the suite again on Python 3.10 + Django 4.2 and (strict) on Python 3.13 + the newest Django.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
need=()
command -v memcached >/dev/null || need+=(memcached)
command -v redis-server >/dev/null || need+=(redis-server)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
command -v ccache >/dev/null || need+=(ccache)
command -v chromium >/dev/null || need+=(chromium)
command -v wrk >/dev/null || need+=(wrk)  # parallel_bench load's generator (tests/test_bench_load.py)
if ((${#need[@]})); then
  echo "== installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${need[@]}"; }
fi

echo "== pip install -e .[test] (builds the fastrouter)"
# Through ccache, paths relative to this checkout: the packaging step compiles the same sources
# with the same flags from the sdist, and reuses these objects instead of compiling them again.
packaging_ccache=(env CMAKE_CXX_COMPILER_LAUNCHER=ccache CCACHE_BASEDIR="$PWD")
"${packaging_ccache[@]}" "$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test]"

echo "== fastrouter: C++ unit tests"
cmake -S fastrouter -B build/fastrouter-test -DCMAKE_BUILD_TYPE=Debug >/dev/null
cmake --build build/fastrouter-test -j2 >/dev/null
ctest --test-dir build/fastrouter-test --output-on-failure

echo "== fastrouter: ASan+UBSan build, router integration tests"
cmake -S fastrouter -B build/fastrouter-asan -DCMAKE_BUILD_TYPE=Debug -DFASTROUTER_SANITIZE=address,undefined -DBUILD_TESTING=OFF >/dev/null
cmake --build build/fastrouter-asan -j2 >/dev/null
PARALLEL_RENDER_FASTROUTER="$PWD/build/fastrouter-asan/fastrouter" \
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$PYTHON" -m pytest -q -p no:django tests/router

echo "== fastrouter: TSan build, router integration tests"
cmake -S fastrouter -B build/fastrouter-tsan -DCMAKE_BUILD_TYPE=Debug -DFASTROUTER_SANITIZE=thread -DBUILD_TESTING=OFF >/dev/null
cmake --build build/fastrouter-tsan -j2 >/dev/null
PARALLEL_RENDER_FASTROUTER="$PWD/build/fastrouter-tsan/fastrouter" TSAN_OPTIONS=halt_on_error=1 \
  "$PYTHON" -m pytest -q -p no:django tests/router

echo "== fastrouter: libFuzzer on the frame parser and routing core (${FASTROUTER_FUZZ_SECONDS:-20} s; set FASTROUTER_FUZZ_SECONDS for longer)"
if ! command -v clang++ >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq clang libclang-rt-14-dev >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq clang libclang-rt-14-dev >/dev/null 2>&1; } || true
fi
if command -v clang++ >/dev/null; then
  cmake -S fastrouter -B build/fastrouter-fuzz -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER=clang++ \
    -DFASTROUTER_FUZZ=ON -DFASTROUTER_BENCH=OFF -DBUILD_TESTING=OFF >/dev/null
  cmake --build build/fastrouter-fuzz -j2 --target fastrouter_fuzz_frame >/dev/null
  fuzz_out=$(mktemp -d)
  if ! build/fastrouter-fuzz/fastrouter_fuzz_frame -max_total_time="${FASTROUTER_FUZZ_SECONDS:-20}" \
      "$fuzz_out" fastrouter/fuzz/corpus >"$fuzz_out.log" 2>&1; then
    tail -60 "$fuzz_out.log"; echo "fuzzing found a crash; the input is the crash-* file named above"; exit 1
  fi
  tail -1 "$fuzz_out.log"
  rm -rf "$fuzz_out" "$fuzz_out.log"
else
  echo "clang++ is not available: fuzzing skipped (apt install clang libclang-rt-14-dev)"
fi

echo "== packaging: the sdist, a wheel built from it, auditwheel repair, the wheel run from a fresh venv"
"${packaging_ccache[@]}" PYTHON="$PYTHON" scripts/package.sh

echo "== ruff"
"$PYTHON" -m ruff check .

echo "== docs: mkdocs build --strict (into build/site)"
# The docs extra, read from pyproject.toml (the one list of it), then the site: a broken link
# or anchor, or a nav entry without its page, fails the build.
mapfile -t docs_deps < <("$PYTHON" - <<'PY'
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["docs"]))
PY
)
"$PYTHON" -m pip install -q --disable-pip-version-check "${docs_deps[@]}"
"$PYTHON" -m mkdocs build --strict --site-dir build/site

echo "== pytest"
"$PYTHON" -m pytest -q --ignore=tests/router "$@"

# The matrix: the suite again on the oldest supported Python and Django, and on the newest
# Python with the newest Django in development mode with warnings as errors. The run above is
# the middle leg (this interpreter with the Django pip chose for it: 5.2 on Python 3.11). Each
# leg has a venv of its own under build/ and imports the package from this checkout with the
# router built above. The legs leave out the tests of the router itself (the sanitizer runs
# above), of whole nodes, runserver and scale-out (process trees and signals), the benchmarks,
# the browser and the wheel builds of test_packaging: they test the machine more than the
# Python and Django versions, and take most of the time. A Python that is not installed skips
# its leg, saying so; PARALLEL_RENDER_MATRIX=0 skips the matrix.
matrix_ignore=(--ignore=tests/router --ignore=tests/test_node.py --ignore=tests/test_runserver.py
  --ignore=tests/test_scaleout.py --ignore=tests/test_bench_load.py --ignore=tests/test_bench_router.py
  --ignore=tests/test_demo_browser.py --ignore=tests/test_metrics.py --ignore=tests/test_packaging.py)

python_version_is() {  # python_version_is PYTHON 3.10
  "$1" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$2'.split('.'))))" 2>/dev/null
}

find_python() {  # find_python 3.10: the newest pyenv build of that version, else python3.10 on PATH
  local version=$1 dir best=""
  for dir in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*; do
    [[ $(basename "$dir") =~ ^[0-9]+\.[0-9]+\.[0-9]+$ && -x $dir/bin/python$version ]] || continue
    best=$(printf '%s\n%s\n' "$best" "$dir/bin/python$version" | sed '/^$/d' | sort -V | tail -1)
  done
  [ -n "$best" ] || best=$(command -v "python$version" || true)
  # a pyenv shim exists for versions that are not selected: make sure it runs that version
  if [ -n "$best" ] && python_version_is "$best" "$version"; then echo "$best"; fi
}

matrix_leg() {  # matrix_leg 3.10 "django>=4.2,<5.0" [strict]
  local version=$1 django=$2 mode=${3:-} python venv log
  python=$(find_python "$version")
  if [ -z "$python" ]; then
    echo "== matrix: Python $version + $django: SKIPPED, no Python $version (looked in ${PYENV_ROOT:-$HOME/.pyenv}/versions/$version.* and for python$version on PATH; \`pyenv install $version\` adds it)"
    matrix_skipped+=("$version")
    return 0
  fi
  venv=build/matrix-py$version
  python_version_is "$venv/bin/python" "$version" || { rm -rf "$venv"; "$python" -m venv "$venv"; }
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade "${deps[@]}" "$django"
  local run=(env PYTHONPATH="$PWD" PARALLEL_RENDER_FASTROUTER="$router" "$venv/bin/python" -m pytest -q "${matrix_ignore[@]}")
  local about
  about="Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), Django $("$venv/bin/python" -c 'import django; print(django.__version__)')"
  if [ "$mode" != strict ]; then
    echo "== matrix: $about"
    "${run[@]}" tests
    return
  fi
  # Development mode, ResourceWarning and DeprecationWarning as errors: in pytest, where an
  # object that was never closed (a socket, a file, a database connection) or an exception in a
  # thread fails its test, and in every process the tests start (workers, gunicorn), which
  # inherit the environment. Their stderr goes to the log (-s), which must not show one either.
  log=build/matrix-py$version.log
  echo "== matrix: $about, development mode, warnings as errors (output: $log)"
  if ! PYTHONDEVMODE=1 PYTHONWARNINGS=error::ResourceWarning,error::DeprecationWarning "${run[@]}" -s \
      -W error::ResourceWarning -W error::DeprecationWarning \
      -W error::pytest.PytestUnraisableExceptionWarning -W error::pytest.PytestUnhandledThreadExceptionWarning \
      tests >"$log" 2>&1; then
    tail -150 "$log"
    echo "the strict leg failed: its whole output is in $log"
    exit 1
  fi
  if grep -n -E -A4 "Exception ignored|ResourceWarning|DeprecationWarning" "$log"; then
    echo "the strict leg passed, but a process it started reported the warnings above (whole output: $log)"
    exit 1
  fi
  tail -1 "$log"
}

if [ "${PARALLEL_RENDER_MATRIX:-1}" != 0 ]; then
  # The router the run above used (the one pip built, unless PARALLEL_RENDER_FASTROUTER names another).
  router=$(DJANGO_SETTINGS_MODULE=tests.settings "$PYTHON" -c "from parallel_render import conf; print(conf.fastrouter_binary())")
  # The dependencies and the test extras, from pyproject.toml (the one list of them).
  mapfile -t deps < <("$PYTHON" - <<'PY'
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["test"]))
PY
  )
  ((${#deps[@]})) || { echo "could not read the dependencies from pyproject.toml"; exit 1; }
  matrix_skipped=()
  matrix_leg 3.10 "django>=4.2,<5.0"
  matrix_leg 3.13 "django" strict
  if ((${#matrix_skipped[@]})); then
    echo "== matrix: Python ${matrix_skipped[*]} not installed: skipped (see above)"
  fi
fi
