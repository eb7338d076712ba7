#!/usr/bin/env bash
# Golden answers before/after a refactor (issue 19): bash run.sh SRC OUTDIR runs every command with --json
# from the source tree SRC on copies of the demo store and a held-out GAN store; compare two runs with
# python cmp.py BEFORE AFTER (paths normalised, timings and the added provenance/closest keys dropped).
set -u
SRC=$1; O=$2; G=${GOLDEN_INPUTS:?set GOLDEN_INPUTS to a folder holding w0/ (a resynth demo --workdir) and heldout/ (scripts/heldout_gans.py --layout labels)}
rm -rf $O; mkdir -p $O; cp -a $G/w0 $O/w
export HF_HUB_OFFLINE=1
R() { ${PYTHON:-python} $(dirname "$0")/rs.py $SRC "$@"; }
S="--store $O/w/store"
run() { local name=$1; shift; R "$@" > $O/$name.json 2> $O/$name.err; echo "rc=$?" >> $O/$name.err; }
run stats stats $S --json
run verify verify $S --json
run sources source list $S --json
D=$O/w/dataset/originals
P="head and shoulders portrait of an old man with a grey beard"
run attr-res attribute $S --json --quiet --prompt "$P" $D/tiny-sd-ddim/000.png $D/tiny-sdxl-dpm/000.png
run attr-stored attribute $S --json --quiet $D/tiny-sd-euler/003.png $D/tiny-sd-euler-a/007.png $D/tiny-sdxl-euler/011.png
run attr-dataset attribute $S --json --quiet --mode dataset $D/tiny-sd-euler/003.png $D/tiny-sdxl-euler/011.png
run attr-combined attribute $S --json --quiet --mode combined $D/tiny-sd-euler/003.png $D/tiny-sdxl-euler/011.png
run attr-refs attribute $S --json --quiet --original-refs 2 --aggregation max $D/tiny-sd-euler/003.png
run attr-adaptive attribute $S --json --quiet --adaptive --prompt "a red bicycle leaning on a brick wall" --per-source 2 $D/tiny-sd-ddim/005.png
run attr-new attribute $S --json --quiet --prompt "a red bicycle leaning on a brick wall" --per-source 2 $D/tiny-sd-ddim/005.png
run calibrate calibrate $S --json --quiet
run attr-cal attribute $S --json --quiet $D/tiny-sd-euler/003.png $D/tiny-sdxl-euler/011.png
run eval-demo evaluate $S --json --quiet $O/w/dataset/manifest.jsonl --out $O/eval-demo
run eval-res evaluate $S --json --quiet $O/w/dataset/resyntheses.jsonl --out $O/eval-res
run stats2 stats $S --json
run verify2 verify $S --json
# held-out GANs in a store of their own, bound to the demo's CLIP
H=$O/h; cp -a $G/heldout $H
C="--clip-checkpoint $O/w/models/clip/open_clip_pytorch_model.bin --clip-config $O/w/models/clip/tiny-clip.json"
run h-init init --store $H/store --json --quiet $C
run h-ingest ingest --store $H/store --json --quiet $H/manifest.csv
run h-stats stats --store $H/store --json
run h-eval evaluate --store $H/store --json --quiet $H/manifest.csv --out $O/eval-h
run h-cal calibrate --store $H/store --json --quiet
run h-attr attribute --store $H/store --json --quiet $H/originals/digiface-dcgan/00-1000.png $H/originals/omniart-eyes/03-1002.png
run h-attr-ds attribute --store $H/store --json --quiet --mode dataset $H/originals/digiface-dcgan/00-1000.png $H/originals/omniart-eyes/03-1002.png
run h-verify verify --store $H/store --json
