#!/bin/bash
# GrokTransfer with the band-chosen weak rule: transfer at 30% test; seeds 0-4 (selection), 5-9 (report)
op=$1; init=$2; lr=$3; wd=$4
cd /work/main
for seed in 0 5; do
  d=results/fig17_${op}_transfer30_seeds${seed}-$((seed+4))
  OMP_NUM_THREADS=1 python exp_modular.py --op $op --seed $seed --seeds 5 --stop_at 0.95 --epochs 1500 \
    --weak_init_scale $init --weak_lr $lr --weak_wd $wd --transfer_at 0.3 --out $d --quiet --ckpt_every 500 > /tmp/s22/gt_${op}_${seed}.log 2>&1
done
