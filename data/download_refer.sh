#!/usr/bin/env bash
# Download the four referring-expression datasets of the DMN paper into the REFER layout
# (lichengunc/refer) that dmn_lib.data.refer.ReferDataset reads:
#
#   <root>/refcoco/   instances.json  refs(unc).p  refs(google).p      UNC      ~ tens of MB
#   <root>/refcoco+/  instances.json  refs(unc).p                      UNC+     ~ tens of MB
#   <root>/refcocog/  instances.json  refs(google).p  refs(umd).p      G-Ref    ~ tens of MB
#   <root>/refclef/   instances.json  refs(unc).p  refs(berkeley).p    ReferIt  ~ tens of MB
#   <root>/images/mscoco/images/train2014/   COCO train2014, 82,783 images, 13 GB zip
#   <root>/images/saiapr_tc-12/              SAIAPR TC-12 subset, 19,997 images, 1-3 GB zip
#
# Usage:  bash data/download_refer.sh [--root DIR] [--only PARTS] [--keep-zips] [--dry-run]
#   --root DIR     where to put everything (default: data/refer next to this script; git-ignored)
#   --only PARTS   comma-separated subset of: refcoco,refcoco+,refcocog,refclef,coco,saiapr
#                  (e.g. --only refcoco,coco for UNC alone). Default: all six.
#   --keep-zips    keep the downloaded zips after extracting (default: delete them)
#   --dry-run      print what would be downloaded and extracted; touch nothing
#
# Idempotent: a part already in place is skipped; an interrupted download resumes (*.part files).
# Needs curl (or wget) and unzip. The UNC server has been unreliable since 2022: every annotation
# zip falls back to its web.archive.org copy. Plan for ~35 GB free while extracting, ~20 GB after.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$SCRIPT_DIR/refer"
ONLY="refcoco,refcoco+,refcocog,refclef,coco,saiapr"
DRY_RUN=0
KEEP_ZIPS=0

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --root) ROOT="${2:?--root needs a folder}"; shift 2 ;;
    --root=*) ROOT="${1#--root=}"; shift ;;
    --only) ONLY="${2:?--only needs a list}"; shift 2 ;;
    --only=*) ONLY="${1#--only=}"; shift ;;
    --keep-zips) KEEP_ZIPS=1; shift ;;
    --dry-run|-n) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "Unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

UNC="http://bvisionweb1.cs.unc.edu/licheng/referit/data"
ARCHIVE="https://web.archive.org/web"

# part | size | extract into (relative to root) | "done" check | URL [fallback URL]
#   "done" check: a file that exists once the part is in place, or DIR:N (a folder with >= N images)
PARTS=(
  "refcoco|tens of MB|.|refcoco/instances.json|$UNC/refcoco.zip $ARCHIVE/20220413011718/$UNC/refcoco.zip"
  "refcoco+|tens of MB|.|refcoco+/instances.json|$UNC/refcoco+.zip $ARCHIVE/20220413011656/$UNC/refcoco+.zip"
  "refcocog|tens of MB|.|refcocog/instances.json|$UNC/refcocog.zip $ARCHIVE/20220413012904/$UNC/refcocog.zip"
  "refclef|tens of MB|.|refclef/instances.json|$UNC/refclef.zip $ARCHIVE/20220413011817/$UNC/refclef.zip"
  "coco|13 GB|images/mscoco/images|images/mscoco/images/train2014:82783|http://images.cocodataset.org/zips/train2014.zip"
  "saiapr|1-3 GB|images|images/saiapr_tc-12:19997|$UNC/images/saiapr_tc-12.zip $ARCHIVE/20220515000000/$UNC/images/saiapr_tc-12.zip"
)

say() { echo "[download_refer] $*"; }

is_done() {  # is_done CHECK -> 0 when the part is already in place
  local check="$1"
  if [[ "$check" == *:* ]]; then
    local dir="$ROOT/${check%%:*}" want="${check##*:}"
    [[ -f "$dir/.complete" ]] && return 0
    [[ -d "$dir" ]] || return 1
    local have
    have=$(find "$dir" -type f -iname '*.jpg' | wc -l)
    [[ "$have" -ge "$want" ]]
  else
    [[ -f "$ROOT/$check" ]]
  fi
}

fetch() {  # fetch OUT URL... : first URL that works wins; resumes OUT.part
  local out="$1"; shift
  local url
  for url in "$@"; do
    say "downloading $url"
    if command -v curl >/dev/null 2>&1; then
      curl -L --fail --retry 3 -C - -o "$out.part" "$url" && mv "$out.part" "$out" && return 0
    else
      wget -c -O "$out.part" "$url" && mv "$out.part" "$out" && return 0
    fi
    say "failed: $url"
  done
  return 1
}

if [[ $DRY_RUN -eq 0 ]]; then
  command -v unzip >/dev/null 2>&1 || { echo "unzip is required (e.g. apt-get install unzip)" >&2; exit 1; }
  command -v curl >/dev/null 2>&1 || command -v wget >/dev/null 2>&1 \
    || { echo "curl or wget is required" >&2; exit 1; }
fi

IFS=',' read -r -a WANTED <<< "$ONLY"
for want in "${WANTED[@]}"; do
  case "$want" in
    refcoco|refcoco+|refcocog|refclef|coco|saiapr) ;;
    *) echo "Unknown part '$want' (valid: refcoco,refcoco+,refcocog,refclef,coco,saiapr)" >&2; exit 2 ;;
  esac
done

say "root: $ROOT$([[ $DRY_RUN -eq 1 ]] && echo '   (dry run: nothing is written)')"
for want in "${WANTED[@]}"; do
  for spec in "${PARTS[@]}"; do
    IFS='|' read -r name size into check urls <<< "$spec"
    [[ "$name" == "$want" ]] || continue
    read -r -a url_list <<< "$urls"
    zip="$ROOT/downloads/$(basename "${url_list[0]}")"
    if is_done "$check"; then
      say "[skip] $name: already in $ROOT/${check%%:*}"
      continue
    fi
    if [[ $DRY_RUN -eq 1 ]]; then
      say "[would download] $name ($size): ${url_list[*]}"
      say "                 -> $zip, then unzip into $ROOT/$into"
      continue
    fi
    mkdir -p "$ROOT/downloads" "$ROOT/$into"
    [[ -f "$zip" ]] || fetch "$zip" "${url_list[@]}" || { echo "Could not download $name" >&2; exit 1; }
    say "extracting $zip -> $ROOT/$into"
    unzip -q -o "$zip" -d "$ROOT/$into"
    if [[ "$check" == *:* ]]; then
      if [[ -d "$ROOT/${check%%:*}" ]]; then
        touch "$ROOT/${check%%:*}/.complete"
      else
        echo "Extracted $zip but $ROOT/${check%%:*} is missing: move the image folder there by hand" >&2
        exit 1
      fi
    fi
    [[ $KEEP_ZIPS -eq 1 ]] || rm -f "$zip"
    say "[done] $name"
  done
done
[[ $DRY_RUN -eq 1 ]] && { say "dry run finished: nothing was downloaded or written"; exit 0; }
say "finished. Use it with: ReferDataset(\"$ROOT\", \"unc\", \"train\")  or  python -m dmn_lib train --data refer --data-root \"$ROOT\" ..."
