#!/usr/bin/env bash
# Bounded fuzz run of the task and config parsers, for CI:  fuzz/run.sh [seconds-per-target]
#
# Installs cargo-fuzz into fuzz/.tools when it is missing, builds the targets, then runs each for
# the given seconds (default 30) from its seed corpus (fuzz/corpus/<target>). New inputs libFuzzer
# finds go to fuzz/target/corpus/<target>, so the committed seeds stay as they are. Exits non-zero
# on a crash, a timeout (-timeout=5 per input) or an out-of-memory (-rss_limit_mb=1024), and prints
# the path of the input that caused it; replay it with
#   RUSTC_BOOTSTRAP=1 fuzz/.tools/bin/cargo-fuzz run --fuzz-dir fuzz <target> <path>
#
# Only stable Rust is needed: RUSTC_BOOTSTRAP=1 lets stable accept the -Z flags cargo-fuzz passes.
# Environment: FUZZ_TARGETS (default: every target), CARGO_FUZZ_VERSION (default 0.13.2).
set -euo pipefail

seconds="${1:-30}"
# A fixed seed by default, so a CI result can be reproduced: the same binary and corpus explore the
# same inputs in the same order (a slower machine gets through a prefix of them). FUZZ_SEED=0 lets
# libFuzzer pick one, for exploratory runs.
seed="${FUZZ_SEED:-1}"
case "$seconds" in
  '' | *[!0-9]*) echo "usage: $0 [seconds-per-target]" >&2; exit 2 ;;
esac
fuzz_dir="$(cd "$(dirname "$0")" && pwd)"
cd "$fuzz_dir"

version="${CARGO_FUZZ_VERSION:-0.13.2}"
tools="$fuzz_dir/.tools"
cargo_fuzz="$tools/bin/cargo-fuzz"
export RUSTC_BOOTSTRAP=1
# Checks the targets may skip (see fuzz_targets/task_file.rs), e.g. ORCH_FUZZ_SKIP=error-line while
# a known gap is open; by default every check runs. The inputs in fuzz/regressions are also seeds.
export ORCH_FUZZ_SKIP="${ORCH_FUZZ_SKIP-}"

now() { date +%s; }
t0=$(now)
if ! { [ -x "$cargo_fuzz" ] && "$cargo_fuzz" --version 2>/dev/null | grep -qx "cargo-fuzz $version"; }; then
  echo "fuzz: installing cargo-fuzz $version into $tools"
  cargo install cargo-fuzz --version "=$version" --locked --root "$tools"
fi
"$cargo_fuzz" --version
t1=$(now)

targets="${FUZZ_TARGETS:-$("$cargo_fuzz" list --fuzz-dir "$fuzz_dir")}"
# cargo-fuzz's default build: optimised, with debug assertions and overflow checks. No sanitizer:
# the parsers are safe Rust, and without ASan the cold build is shorter and each second of fuzzing
# does more executions. 16 codegen units: a much shorter cold build for slightly slower runs.
build_flags=(--fuzz-dir "$fuzz_dir" --sanitizer none --codegen-units 16)
echo "fuzz: building $(echo $targets)"
"$cargo_fuzz" build "${build_flags[@]}"
t2=$(now)

status=0
for target in $targets; do
  work="$fuzz_dir/target/corpus/$target"
  artifacts="$fuzz_dir/artifacts/$target"
  mkdir -p "$work" "$artifacts"
  log="$fuzz_dir/target/fuzz-$target.log"
  echo "fuzz: $target for ${seconds}s (log: $log)"
  set +e
  "$cargo_fuzz" run "${build_flags[@]}" "$target" "$work" "$fuzz_dir/corpus/$target" -- \
    -max_total_time="$seconds" -seed="$seed" -timeout=5 -rss_limit_mb=1024 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  # The last status line and the final stats: executions, rate, corpus.
  grep -E '^#[0-9]+ +(DONE|pulse|NEW|REDUCE)' "$log" | tail -1 || true
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$log" || true
  if [ $rc -ne 0 ]; then
    status=1
    echo "fuzz: $target FAILED (exit $rc); from the log:" >&2
    grep -E -A3 "panicked at|^==[0-9]+== ERROR|^SUMMARY|ALARM|out-of-memory|Timeout" "$log" | head -40 >&2
    crash=$(grep -oE 'Test unit written to [^ ]+' "$log" | tail -1 | sed 's/^Test unit written to //')
    if [ -n "$crash" ]; then
      echo "fuzz: $target crash input: $crash" >&2
      echo "fuzz: reproduce: RUSTC_BOOTSTRAP=1 $cargo_fuzz run ${build_flags[*]} $target $crash" >&2
      echo "fuzz: minimise:  RUSTC_BOOTSTRAP=1 $cargo_fuzz tmin ${build_flags[*]} $target $crash" >&2
    else
      echo "fuzz: $target failed without a crash input (build or setup problem?)" >&2
    fi
  fi
done
t3=$(now)
echo "fuzz: install/check $((t1 - t0))s, build $((t2 - t1))s, runs $((t3 - t2))s, total $((t3 - t0))s"
exit $status
