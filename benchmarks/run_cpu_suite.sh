#!/usr/bin/env bash
# The CPU measurements behind benchmarks/RESULTS.md, run one after another on a quiet machine
# (timings are ratios within each run; never run this beside another job).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
B=.venv/bin/accel-bench
run() { echo "== $*"; "$@"; echo "rc=$?"; }
run $B --model digits-dit --methods all --out "$OUT/main"
run $B --model digits-dit --methods none,delta-dit,bac,fbcache,taylorseer,magcache,pab,fastercache \
    --sweep --min-psnr 30 --steps 50 --repeats 2 --out "$OUT/cache50"
run $B --model digits-dit --methods none,delta-dit,bac,fbcache,taylorseer,magcache,pab,fastercache \
    --sweep --min-psnr 30 --steps 20 --repeats 3 --out "$OUT/cache20"
run .venv/bin/python -m accel.benchmarks.attention_bench --seq 4096 16384 32768 --density 0.1 0.2 0.4 \
    --repeats 3 --out "$OUT/attention.json"
run $B --model digits-video-dit --methods none,adaspa:sparsity=0.5,adaspa:sparsity=0.7,adaspa:sparsity=0.85,vmoba:top_k=2,vmoba:top_k=4,vmoba:top_k=6,delta-dit,bac \
    --steps 10 --labels 3 --repeats 1 --out "$OUT/video"
run .venv/bin/python -m accel.benchmarks.quest_bench --bits w8a8,w4a8,w4a4 --steps 20 --per-label 2 --iters 60 \
    --repeats 3 --threads 2 --out "$OUT/quest.json"
