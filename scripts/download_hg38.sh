#!/usr/bin/env bash
# Download hg38 (UCSC, soft-masked, ~940 MB gzip) and the Basenji/Enformer interval bed
# (`chrom start end split`, the hold-out used by HyenaDNA and Caduceus) for conf/data/hg38.yaml.
#
#   scripts/download_hg38.sh [DEST]        # DEST default: $GLMTRAIN_DATA/hg38 or ./data/hg38
#
# Checksums: hg38.fa.gz is checked against UCSC's published md5sum.txt. The bed file has no
# published checksum: its sha256 is checked against BED_SHA256 when that is set, otherwise it is
# recorded in DEST/SHA256SUMS on the first download and verified on every later run.
# Downloads go to *.part and are renamed only once verified; re-running resumes or skips.
# Then:  python -m glmtrain.data build data=hg38 out=<shard dir> workers=<cpus>
set -euo pipefail

DEST="${1:-${GLMTRAIN_DATA:-data}/hg38}"
UCSC="${UCSC_URL:-https://hgdownload.soe.ucsc.edu/goldenPath/hg38/bigZips}"
BED_URL="${BED_URL:-https://storage.googleapis.com/basenji_barnyard2/sequences_human.bed}"
mkdir -p "$DEST"
cd "$DEST"

fetch() {  # url out
    if command -v curl >/dev/null; then
        curl -fL --retry 3 -C - -o "$2.part" "$1"
    else
        wget -c -O "$2.part" "$1"
    fi
}

sha256() { sha256sum "$1" | cut -d' ' -f1; }

# --- hg38.fa.gz, verified against UCSC's md5sum.txt
fetch "$UCSC/md5sum.txt" md5sum.txt && mv md5sum.txt.part md5sum.txt
want=$(awk '$2 == "hg38.fa.gz" {print $1}' md5sum.txt)
[ -n "$want" ] || { echo "download_hg38: md5sum.txt lists no hg38.fa.gz" >&2; exit 1; }
if [ -f hg38.fa.gz ] && [ "$(md5sum hg38.fa.gz | cut -d' ' -f1)" = "$want" ]; then
    echo "download_hg38: hg38.fa.gz present and verified"
else
    fetch "$UCSC/hg38.fa.gz" hg38.fa.gz
    got=$(md5sum hg38.fa.gz.part | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
        echo "download_hg38: hg38.fa.gz md5 $got != published $want; removed the partial file, run again" >&2
        rm -f hg38.fa.gz.part
        exit 1
    fi
    mv hg38.fa.gz.part hg38.fa.gz
    echo "download_hg38: hg38.fa.gz verified (md5 $got)"
fi

# --- sequences_human.bed (Basenji/Enformer intervals)
recorded=$(awk '$2 == "sequences_human.bed" {print $1}' SHA256SUMS 2>/dev/null || true)
want_bed="${BED_SHA256:-$recorded}"
if [ -f sequences_human.bed ] && [ -n "$want_bed" ] && [ "$(sha256 sequences_human.bed)" = "$want_bed" ]; then
    echo "download_hg38: sequences_human.bed present and verified"
else
    [ -f sequences_human.bed ] && echo "download_hg38: sequences_human.bed does not match its checksum; downloading it again"
    rm -f sequences_human.bed.part
    fetch "$BED_URL" sequences_human.bed
    got=$(sha256 sequences_human.bed.part)
    if [ -n "$want_bed" ] && [ "$got" != "$want_bed" ]; then
        echo "download_hg38: sequences_human.bed sha256 $got != expected $want_bed" >&2
        rm -f sequences_human.bed.part
        exit 1
    fi
    # sanity: four columns, splits train/valid/test
    bad=$(awk 'NF < 4 || ($4 != "train" && $4 != "valid" && $4 != "test") {n++} END {print n+0}' sequences_human.bed.part)
    if [ "$bad" != "0" ]; then
        echo "download_hg38: sequences_human.bed has $bad malformed line(s); not using it" >&2
        rm -f sequences_human.bed.part
        exit 1
    fi
    mv sequences_human.bed.part sequences_human.bed
    if [ -z "$recorded" ]; then
        echo "$got  sequences_human.bed" >> SHA256SUMS
        echo "download_hg38: recorded sha256 $got of sequences_human.bed in $DEST/SHA256SUMS"
    fi
fi
awk '{n[$4]++} END {for (s in n) printf "download_hg38: %s intervals: %d\n", s, n[s]}' sequences_human.bed
echo "download_hg38: done; next: python -m glmtrain.data build data=hg38 out=<shard dir> workers=<cpus>"
