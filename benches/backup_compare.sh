#!/usr/bin/env bash
# cbtsim's backups (a full, then incrementals driven by change IDs) against restic and
# borg backing up the same disk as an image file, as tools without changed-block
# tracking must: they read the whole image every time.
#
#   bash benches/backup_compare.sh [--size 4G] [--fill 1G] [--ops 3000] [--incrementals 3]
#                                  [--profile oltp-db] [--dir DIR] [--json]
#
# One VM with one disk of --size; its first --fill bytes are written with random data (an
# installed guest), then for each round: --ops ops of the --profile workload (cbtsim
# guest run), a cbtsim backup, an export of the disk to a raw image (cbtsim disk read:
# sparse), a restic backup and a borg create of that image. Round 0 is the full backup.
# Each tool runs under /usr/bin/time: wall seconds and peak RSS. Bytes read: cbtsim's
# report (the changed areas it read), restic's total_bytes_processed and borg's
# original_size (the whole image). Bytes stored: the growth of each repository
# directory (du --apparent-size), so the same measure for all three. restic 0.14 (Debian 12)
# stores uncompressed (repository v1); borg uses its default lz4; cbtsim zstd level 1.
# Needs: restic, borg (apt-get install -y restic borgbackup), a release build of cbtsim
# (CBTSIM=path, default target/release/cbtsim). Not run by the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=4G FILL=1G OPS=3000 INCS=3 PROFILE=oltp-db DIR=${TMPDIR:-/tmp} JSON=0
while [ $# -gt 0 ]; do
  case "$1" in
    --size) SIZE=$2; shift 2 ;;
    --fill) FILL=$2; shift 2 ;;
    --ops) OPS=$2; shift 2 ;;
    --incrementals) INCS=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --json) JSON=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
CBTSIM=${CBTSIM:-target/release/cbtsim}
for tool in restic borg /usr/bin/time "$CBTSIM"; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done

WORK=$(mktemp -d "$DIR/cbtsim-compare.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export CBTSIM_DATASTORE=$WORK/ds RESTIC_PASSWORD=bench BORG_PASSPHRASE= \
  BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_BASE_DIR=$WORK/borg-home \
  RESTIC_CACHE_DIR=$WORK/restic-cache
IMG=$WORK/disk.img
bytes() { du -sb --apparent-size "$1" | cut -f1; }
# timed OUT CMD...: runs CMD, its stdout to OUT; sets SECS and RSS_MB.
timed() {
  local out=$1; shift
  /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >"$out"
  read -r SECS RSS_KB <"$WORK/time"
  RSS_MB=$((RSS_KB / 1024))
}
ROWS=()
row() { # tool round seconds read stored rss_mb
  ROWS+=("$1|$2|$3|$4|$5|$6")
  if [ "$JSON" = 1 ]; then
    printf '{"bench":"backup_compare","size":"%s","fill":"%s","ops":%s,"profile":"%s","tool":"%s","round":"%s","seconds":%s,"bytes_read":%s,"bytes_stored":%s,"peak_rss_mb":%s}\n' \
      "$SIZE" "$FILL" "$OPS" "$PROFILE" "$1" "$2" "$3" "$4" "$5" "$6"
  fi
}

"$CBTSIM" vm create bench --disk "$SIZE" >/dev/null
head -c "$FILL" /dev/urandom >"$WORK/fill.bin"
"$CBTSIM" disk write bench 0 0 "$FILL" --from "$WORK/fill.bin" >/dev/null
rm "$WORK/fill.bin"
restic -q -r "$WORK/restic" init >/dev/null
borg init -e none "$WORK/borg" >/dev/null

for round in $(seq 0 "$INCS"); do
  name=$([ "$round" = 0 ] && echo full || echo "inc$round")
  if [ "$round" -gt 0 ]; then
    "$CBTSIM" guest run bench --profile "$PROFILE" --ops "$OPS" --seed "$round" >/dev/null
  fi
  before=$(bytes "$WORK/cbt" 2>/dev/null || echo 0)
  timed "$WORK/cbt.json" "$CBTSIM" backup run bench --repo "$WORK/cbt" --json
  read_bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bytes_read"])' "$WORK/cbt.json")
  row cbtsim "$name" "$SECS" "$read_bytes" $(($(bytes "$WORK/cbt") - before)) "$RSS_MB"

  timed /dev/null "$CBTSIM" disk read bench 0 0 "$SIZE" --out "$IMG"
  row "export (cbtsim disk read)" "$name" "$SECS" "$(stat -c %s "$IMG")" 0 "$RSS_MB"

  before=$(bytes "$WORK/restic")
  timed "$WORK/restic.json" restic -r "$WORK/restic" backup --json "$IMG"
  read_bytes=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("message_type") == "summary":
        print(m["total_bytes_processed"])' "$WORK/restic.json")
  row restic "$name" "$SECS" "$read_bytes" $(($(bytes "$WORK/restic") - before)) "$RSS_MB"

  before=$(bytes "$WORK/borg")
  timed "$WORK/borg.json" borg create --json "$WORK/borg::$name" "$IMG"
  read_bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["archive"]["stats"]["original_size"])' "$WORK/borg.json")
  row borg "$name" "$SECS" "$read_bytes" $(($(bytes "$WORK/borg") - before)) "$RSS_MB"
done

if [ "$JSON" = 0 ]; then
  echo "disk $SIZE ($FILL written first), profile $PROFILE, $OPS ops between backups"
  echo
  echo "| tool | backup | seconds | read | stored | peak RSS |"
  echo "|---|---|---:|---:|---:|---:|"
  for r in "${ROWS[@]}"; do
    IFS='|' read -r tool name secs rd st rss <<<"$r"
    echo "| $tool | $name | $secs | $(numfmt --to=iec-i --suffix=B "$rd") | $(numfmt --to=iec-i --suffix=B "$st") | ${rss} MiB |"
  done
fi
