#!/bin/bash
# weak-model search on seeds 0-4: init x lr x wd, 1e4 epochs, full trajectories
op=$1; shift
cd /work/main
for init in 0.5 1.0; do for lr in 0.003 0.01; do for wd in 0.3 1.0 3.0; do
  d=/tmp/s22/weak/${op}_${init}_${lr}_${wd}
  [ -f $d/summary.json ] && continue
  OMP_NUM_THREADS=1 python exp_modular.py --op $op --phases weak --seeds 5 --weak_init_scale $init \
    --weak_lr $lr --weak_wd $wd --out $d --quiet --ckpt_every 0 > $d.log 2>&1
done; done; done
