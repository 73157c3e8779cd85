#!/usr/bin/env bash
# Runs every test: installs what the tests need (Debian packages, the package itself with the
# fastrouter), the C++ unit tests, sanitizer builds of the router, ruff, and the pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
need=()
command -v memcached >/dev/null || need+=(memcached)
command -v redis-server >/dev/null || need+=(redis-server)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
command -v chromium >/dev/null || need+=(chromium)
if ((${#need[@]})); then
  echo "== installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${need[@]}"; }
fi

echo "== pip install -e .[test] (builds the fastrouter)"
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test]"

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

echo "== ruff"
"$PYTHON" -m ruff check .

echo "== pytest"
"$PYTHON" -m pytest -q --ignore=tests/router "$@"
