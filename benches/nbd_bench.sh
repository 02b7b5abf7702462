#!/usr/bin/env bash
# NBD throughput of `cbtsim serve` beside qemu-nbd (benches/README.md).
#
# Read: `nbdcopy EXPORT null:` of a snapshot export (web/0@s1) of a disk
# filled with random data, against qemu-nbd serving the same bytes from a
# raw file (read-only, --shared=8). Write: `nbdcopy FILE EXPORT` of random
# data into the live export (web/0: guest writes, tracked, copy-on-write into
# the snapshot's delta), against qemu-nbd serving a qcow2 image with a
# persistent dirty bitmap (-B, 64 KiB granularity), and a 4 KiB random-write
# fio job (nbd engine, iodepth 16) on both. One warm-up run per target first
# (it allocates: qcow2 clusters, our delta's grains), so timed runs
# overwrite. Runs alternate between the servers (A/B interleaved). Prints
# MiB/s (fio: IOPS) as the median of N runs, and the server's CPU seconds
# per GiB (user + system of the server process over the runs, from /proc).
# Everything lives in the page cache (no flush): this measures the servers,
# not the disk.
#
# usage: benches/nbd_bench.sh [--quick] [--json] [-n RUNS] [-s MIB]
#   CBTSIM=path/to/cbtsim (default: target/release/cbtsim, built if missing)
set -euo pipefail

runs=5
mib=1024
json=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) runs=3; mib=256 ;;
    --json) json=1 ;;
    -n) runs="$2"; shift ;;
    -s) mib="$2"; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "nbd_bench.sh: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for tool in qemu-nbd qemu-img nbdcopy nbdinfo fio python3 awk sort; do
  command -v "$tool" >/dev/null || { echo "nbd_bench.sh: error: $tool is not installed (Debian: qemu-utils libnbd-bin fio)" >&2; exit 1; }
done
root=$(cd "$(dirname "$0")/.." && pwd)
cbtsim=${CBTSIM:-$root/target/release/cbtsim}
if [ ! -x "$cbtsim" ]; then
  (cd "$root" && cargo build --release -q -p cbtsim)
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/nbd-bench.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
size=$((mib << 20))
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
now() { date +%s%N; }

head -c "$size" /dev/urandom >"$dir/data.raw"
head -c "$size" /dev/urandom >"$dir/data2.raw"
ds="$dir/ds"
"$cbtsim" --datastore "$ds" vm create web --disk "${mib}M" >/dev/null
"$cbtsim" --datastore "$ds" disk write web 0 0 "${mib}M" --from "$dir/data.raw" >/dev/null
"$cbtsim" --datastore "$ds" snapshot create web s1 >/dev/null

CBTSIM_PASSWORD=bench "$cbtsim" --datastore "$ds" serve --plain-http --listen 127.0.0.1:0 --nbd 127.0.0.1:0 --json >"$dir/serve.json" 2>"$dir/serve.err" &
cbt_pid=$!
pids+=("$cbt_pid")
for _ in $(seq 100); do [ -s "$dir/serve.json" ] && break; sleep 0.1; done
cbt_addr=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["nbd"])' "$dir/serve.json")

qr_port=$(free_port)
qemu-nbd -f raw -r -x data -b 127.0.0.1 -p "$qr_port" -t -e 8 "$dir/data.raw" &
qr_pid=$!
pids+=("$qr_pid")
qemu-img create -q -f qcow2 "$dir/w.qcow2" "$size"
qemu-img bitmap --add --granularity 65536 "$dir/w.qcow2" b0
qw_port=$(free_port)
qemu-nbd -f qcow2 -B b0 -x w -b 127.0.0.1 -p "$qw_port" -t -e 8 "$dir/w.qcow2" &
qw_pid=$!
pids+=("$qw_pid")
for _ in $(seq 100); do
  nbdinfo --size "nbd://127.0.0.1:$qr_port/data" >/dev/null 2>&1 && nbdinfo --size "nbd://127.0.0.1:$qw_port/w" >/dev/null 2>&1 && break
  sleep 0.1
done

cbt_read="nbd://$cbt_addr/web/0@s1"
cbt_write="nbd://$cbt_addr/web/0"
q_read="nbd://127.0.0.1:$qr_port/data"
q_write="nbd://127.0.0.1:$qw_port/w"
multi() { nbdinfo --can multi-conn "$1" && echo yes || echo no; }
echo "multi-conn: cbtsim read $(multi "$cbt_read") write $(multi "$cbt_write"); qemu-nbd read $(multi "$q_read") write $(multi "$q_write")" >&2

# One timed run: prints "MIB_PER_S SERVER_CPU_TICKS".
timed() {
  local pid=$1; shift
  local c0 t0 t1 c1
  c0=$(cpu_ticks "$pid"); t0=$(now)
  "$@" >/dev/null
  t1=$(now); c1=$(cpu_ticks "$pid")
  awk -v s="$size" -v ns=$((t1 - t0)) -v c=$((c1 - c0)) 'BEGIN { printf "%.1f %d\n", s / 1048576 / (ns / 1e9), c }'
}
# fio 4 KiB random writes for 5 s (3 with --quick): prints "IOPS SERVER_CPU_TICKS".
fio_run() {
  local pid=$1 uri=$2 secs=5 c0 c1 iops
  [ "$runs" -le 3 ] && secs=3
  c0=$(cpu_ticks "$pid")
  fio --name=r --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=16 --thread \
    --size="$size" --time_based --runtime="$secs" --output-format=json --output="$dir/fio.json" >/dev/null 2>&1
  # fio may print notes before its JSON document.
  iops=$(python3 -c 'import json,sys; t=open(sys.argv[1]).read(); print(round(json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"]))' "$dir/fio.json")
  c1=$(cpu_ticks "$pid")
  echo "$iops $((c1 - c0)) $secs"
}

# Warm-up: one of each (fills caches, allocates the write targets).
nbdcopy "$cbt_read" null: && nbdcopy "$q_read" null:
nbdcopy "$dir/data2.raw" "$cbt_write" && nbdcopy "$dir/data2.raw" "$q_write"

declare -A res
for ((i = 0; i < runs; i++)); do
  for conn in default 1; do
    opt=(); [ "$conn" = 1 ] && opt=(--connections=1)
    res[cr$conn]+="$(timed "$cbt_pid" nbdcopy "${opt[@]}" "$cbt_read" null:)"$'\n'
    res[qr$conn]+="$(timed "$qr_pid" nbdcopy "${opt[@]}" "$q_read" null:)"$'\n'
    res[cw$conn]+="$(timed "$cbt_pid" nbdcopy "${opt[@]}" "$dir/data.raw" "$cbt_write")"$'\n'
    res[qw$conn]+="$(timed "$qw_pid" nbdcopy "${opt[@]}" "$dir/data.raw" "$q_write")"$'\n'
  done
  res[cf]+="$(fio_run "$cbt_pid" "$cbt_write")"$'\n'
  res[qf]+="$(fio_run "$qw_pid" "$q_write")"$'\n'
done

hz=$(getconf CLK_TCK)
med() { printf '%s' "${res[$1]}" | awk 'NF { print $1 }' | median; }
# Server CPU seconds per GiB moved (all runs of the key).
cpu_per_gib() { printf '%s' "${res[$1]}" | awk -v hz="$hz" -v gib="$(awk -v s="$size" 'BEGIN { print s / 1073741824 }')" 'NF { c += $2; n++ } END { printf "%.2f", c / hz / (n * gib) }'; }
# Server CPU seconds per 100k fio writes.
cpu_per_100k() { printf '%s' "${res[$1]}" | awk -v hz="$hz" 'NF { c += $2; w += $1 * $3 } END { printf "%.2f", c / hz / (w / 100000) }'; }

if [ "$json" = 1 ]; then
  printf '{"mib":%d,"runs":%d' "$mib" "$runs"
  for k in cr qr cw qw; do
    for conn in default 1; do printf ',"%s_%s_mib_s":%s,"%s_%s_cpu_s_per_gib":%s' "$k" "$conn" "$(med "$k$conn")" "$k" "$conn" "$(cpu_per_gib "$k$conn")"; done
  done
  printf ',"cbtsim_fio_iops":%s,"qemu_fio_iops":%s,"cbtsim_fio_cpu_s_per_100k":%s,"qemu_fio_cpu_s_per_100k":%s}\n' \
    "$(med cf)" "$(med qf)" "$(cpu_per_100k cf)" "$(cpu_per_100k qf)"
  exit 0
fi
echo "NBD throughput, ${mib} MiB, median of $runs runs (server CPU s per GiB moved)"
printf '%-52s %14s %14s\n' "" "cbtsim serve" "qemu-nbd"
for conn in default 1; do
  label="connections: nbdcopy default"; [ "$conn" = 1 ] && label="connections: 1"
  printf '%-52s %9s MiB/s %9s MiB/s\n' "read snapshot -> null: ($label)" "$(med cr$conn)" "$(med qr$conn)"
  printf '%-52s %14s %14s\n' "  server CPU s/GiB" "$(cpu_per_gib cr$conn)" "$(cpu_per_gib qr$conn)"
  printf '%-52s %9s MiB/s %9s MiB/s\n' "write file -> live disk / qcow2+bitmap" "$(med cw$conn)" "$(med qw$conn)"
  printf '%-52s %14s %14s\n' "  server CPU s/GiB" "$(cpu_per_gib cw$conn)" "$(cpu_per_gib qw$conn)"
done
printf '%-52s %10s IOPS %10s IOPS\n' "fio 4k randwrite, iodepth 16" "$(med cf)" "$(med qf)"
printf '%-52s %14s %14s\n' "  server CPU s per 100k writes" "$(cpu_per_100k cf)" "$(cpu_per_100k qf)"
