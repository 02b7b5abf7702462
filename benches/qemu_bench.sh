#!/usr/bin/env bash
# QEMU's own change-tracking cost, side by side with ours (benches/README.md).
#
# `qemu-img bench` writes 4 KiB requests through the qcow2 layer into a null
# data file (driver null-co: no data I/O), with 0, 1 and 4 persistent dirty
# bitmaps of 64 KiB granularity on the image. Runs alternate between the
# images (A/B interleaved, so machine drift hits all alike); each bitmap is
# cleared before its run. Prints ns per 4 KiB write (median of N runs) and the
# throughput ratio with bitmaps / without (median of per-run ratios), the
# same sense as `overhead`'s "ratio", both by wall time (what qemu-img reports)
# and by CPU time (user + system of the qemu-img process: on a machine shared
# with other busy processes, preemption inflates wall time only).
#
# usage: benches/qemu_bench.sh [--quick] [--json] [-n RUNS] [-c REQUESTS]
set -euo pipefail

runs=9
count=1000000
json=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) runs=3; count=300000 ;;
    --json) json=1 ;;
    -n) runs="$2"; shift ;;
    -c) count="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "qemu_bench.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for tool in qemu-img awk sort; do
  command -v "$tool" >/dev/null || { echo "qemu_bench.sh: error: $tool is not installed (Debian: qemu-utils)" >&2; exit 1; }
done

dir=$(mktemp -d "${TMPDIR:-/tmp}/qemu-bench.XXXXXX")
trap 'rm -rf "$dir"' EXIT
size=68719476736 # 64 GiB
bitmaps=(0 1 4)
for k in "${bitmaps[@]}"; do
  qemu-img create -q -f qcow2 -o "data_file=$dir/data$k.raw,data_file_raw=on,preallocation=metadata" "$dir/m$k.qcow2" "$size"
  for ((b = 0; b < k; b++)); do
    qemu-img bitmap --add --granularity 65536 "$dir/m$k.qcow2" "b$b"
  done
done

# One run: "WALL CPU" seconds for $count writes on image m$1, its bitmaps cleared first.
run() {
  local k=$1 out cpu
  for ((b = 0; b < k; b++)); do qemu-img bitmap --clear "$dir/m$k.qcow2" "b$b"; done
  local TIMEFORMAT='%U %S'
  { time qemu-img bench -w --image-opts -c "$count" -s 4k -S 64k \
    "driver=qcow2,file.driver=file,file.filename=$dir/m$k.qcow2,data-file.driver=null-co,data-file.size=$size" \
    >"$dir/out" 2>&1; } 2>"$dir/time"
  out=$(awk '/Run completed in/ { print $4 }' "$dir/out")
  cpu=$(awk '{ print $1 + $2 }' "$dir/time")
  [ -n "$out" ] && echo "$out $cpu"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

declare -A secs cpus
for ((i = 0; i < runs; i++)); do
  # Rotate the order each run.
  for ((j = 0; j < ${#bitmaps[@]}; j++)); do
    k=${bitmaps[$(((i + j) % ${#bitmaps[@]}))]}
    r=$(run "$k") || true
    [ -n "$r" ] || { echo "qemu_bench.sh: error: qemu-img bench printed no time for $k bitmap(s)" >&2; exit 1; }
    secs[$k]+="${r% *} "
    cpus[$k]+="${r#* } "
  done
done

# Median ns per write of a list of seconds.
ns_median() { for s in $1; do awk -v s="$s" -v c="$count" 'BEGIN { printf "%.1f\n", s * 1e9 / c }'; done | median; }
# Median of per-run ratios (no-bitmap time / this time) of two lists.
ratio_median() {
  local -a a b
  read -r -a a <<<"$1"
  read -r -a b <<<"$2"
  for ((i = 0; i < runs; i++)); do awk -v x="${a[$i]}" -v y="${b[$i]}" 'BEGIN { printf "%.4f\n", x / y }'; done | median
}

[ "$json" = 1 ] || {
  printf 'qemu-img %s, %s runs of %s 4 KiB writes, null data path\n' "$(qemu-img --version | awk 'NR==1{print $3}')" "$runs" "$count"
  printf '%8s  %12s  %8s  %16s  %9s\n' bitmaps ns_per_write ratio cpu_ns_per_write cpu_ratio
}
for k in "${bitmaps[@]}"; do
  ns=$(ns_median "${secs[$k]}")
  cns=$(ns_median "${cpus[$k]}")
  ratio=$(ratio_median "${secs[0]}" "${secs[$k]}")
  cratio=$(ratio_median "${cpus[0]}" "${cpus[$k]}")
  if [ "$json" = 1 ]; then
    printf '{"bench":"qemu","case":"4k-null","bitmaps":%s,"threads":1,"ns_per_write":%s,"ratio":%s,"cpu_ns_per_write":%s,"cpu_ratio":%s,"runs":%s,"requests":%s}\n' \
      "$k" "$ns" "$ratio" "$cns" "$cratio" "$runs" "$count"
  else
    printf '%8s  %12s  %8s  %16s  %9s\n' "$k" "$ns" "$ratio" "$cns" "$cratio"
  fi
done
