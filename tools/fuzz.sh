#!/usr/bin/env bash
# Runs albef's fuzz targets (fuzz/, cargo-fuzz + libFuzzer) one after another, each for a number of
# inputs or seconds, under the limits every target must keep: no panic or abort, no input taking
# more than --timeout seconds, no allocation over --malloc-mb, resident memory under --rss-mb
# (leaks are not checked: a reader that returns frees what it made, and LeakSanitizer needs ptrace).
#
#   tools/fuzz.sh [--runs N] [--time S] [--timeout S] [--no-build] [TARGET...]
#
# Default: every target, --time 60. Both --runs and --time: whichever comes first (the long run:
# --runs 1000000 --time 3600). Needs a nightly toolchain and cargo-fuzz
# (`rustup toolchain install nightly --profile minimal`, `cargo install cargo-fuzz --locked`).
# Corpora grow in fuzz/corpus/<target> (seeds: fuzz/seeds/<target> and the repo's fixtures);
# a crashing input is written to fuzz/artifacts/<target>/ and the script exits non-zero.
# Logs: target/fuzz-logs/<target>.log; a table of inputs, exec/s and outcome at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL=(pth safetensors config_yaml bert_config annotations tokenizer refer_pickle parquet shards image)
limit=()
timeout=10
malloc_mb=512
rss_mb=2048
build=1
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) limit+=(-runs="$2"); shift 2 ;;
    --time) limit+=(-max_total_time="$2"); shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --malloc-mb) malloc_mb="$2"; shift 2 ;;
    --rss-mb) rss_mb="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL[@]}")
[ ${#limit[@]} -gt 0 ] || limit=(-max_total_time=60)

# The repo's own fixtures, as extra (read-only) seed folders.
extra_seeds() {
  case "$1" in
    config_yaml|bert_config) echo "configs configs/tiny" ;;
    safetensors) echo "tests/fixtures/preprocess" ;;
    image) echo "tests/fixtures/preprocess" ;;
    *) echo "" ;;
  esac
}
# Inputs larger than the largest seed teach nothing more and slow every execution.
max_len() {
  case "$1" in
    pth|safetensors|parquet|shards|image) echo 65536 ;;
    *) echo 16384 ;;
  esac
}

if [ "$build" = 1 ]; then
  if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz on a nightly toolchain is needed: rustup toolchain install nightly --profile minimal" \
      "&& cargo install cargo-fuzz --locked" >&2
    exit 1
  fi
  (cd fuzz && nice -n 10 cargo +nightly fuzz build -O)
fi
bin=fuzz/target/x86_64-unknown-linux-gnu/release
mkdir -p target/fuzz-logs
scratch=$(mktemp -d "${TMPDIR:-/dev/shm}/albef-fuzz.XXXXXX" 2>/dev/null || mktemp -d)
trap 'rm -rf "$scratch"' EXIT

failed=0
summary=()
for t in "${targets[@]}"; do
  [ -x "$bin/$t" ] || { echo "no fuzz target $t (build first, or one of: ${ALL[*]})" >&2; exit 2; }
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  log="target/fuzz-logs/$t.log"
  seeds=("fuzz/seeds/$t")
  for d in $(extra_seeds "$t"); do seeds+=("$d"); done
  echo "== $t (${limit[*]}, log $log)"
  rc=0
  ALBEF_FUZZ_SCRATCH="$scratch/$t" nice -n 19 "$bin/$t" "${limit[@]}" -timeout="$timeout" \
    -malloc_limit_mb="$malloc_mb" -rss_limit_mb="$rss_mb" -max_len="$(max_len "$t")" \
    -detect_leaks=0 -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" \
    "fuzz/corpus/$t" "${seeds[@]}" >"$log" 2>&1 || rc=$?
  # A failed run has no final stats: every lookup may come back empty.
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  secs=$(grep -o 'DONE *cov: [0-9]* ft: [0-9]* corp: [0-9/]*[a-zA-Z]* lim: [0-9]* exec/s: [0-9]* rss: [0-9]*Mb' "$log" | tail -1 || true)
  if [ "$rc" = 0 ]; then
    outcome=ok
  else
    outcome="FAILED (rc $rc): $(grep -m1 -E '^==[0-9]+== ERROR|^SUMMARY|panicked at|out-of-memory|timeout' "$log" || echo 'see log')"
    failed=1
  fi
  summary+=("$(printf '%-13s %12s %8s  %s' "$t" "${runs:-?}" "${rate:-?}" "$outcome")")
  tail -n 4 "$log" | sed 's/^/   /'
  if [ -n "$secs" ]; then echo "   $secs"; fi
done
printf '\n%-13s %12s %8s  %s\n' target inputs exec/s outcome
printf '%s\n' "${summary[@]}"
exit $failed
