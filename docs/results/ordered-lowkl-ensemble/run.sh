#!/bin/bash
# Does the RM ensemble help where over-optimisation happens? ordered at KL 0.01 (the tuner rejected it), 3 seeds.
cd /work/main
export RTO_PROGRESS=0 OMP_NUM_THREADS=1
R=.venv/bin/rto
while pgrep -f "runs/exp2.sh" > /dev/null; do sleep 5; done
start=$(date +%s)
for s in 0 1 2; do
  S=runs/repro_ordered/seed$s
  for v in ppo ppo+ens; do
    $R ppo --config $S/configs/$v.yaml --kl-coef 0.01 --out runs/ens_lowkl/seed$s/$v --threads 1 > runs/ens_lowkl_seed${s}_$v.log 2>&1 &
  done
  wait
  $R eval --models sft=$S/sft,ppo=runs/ens_lowkl/seed$s/ppo/policy,ppo@last=runs/ens_lowkl/seed$s/ppo/policy_last,ppo+ens=runs/ens_lowkl/seed$s/ppo+ens/policy,ppo+ens@last=runs/ens_lowkl/seed$s/ppo+ens/policy_last \
     --prompts $S/data/test_prompts.jsonl --task ordered --out runs/ens_lowkl/seed$s/eval.json --max-new-tokens 16 --seed $s --threads 2 > runs/ens_lowkl_eval$s.log 2>&1
done
echo "ens_lowkl $(( $(date +%s) - start )) s" >> runs/exp.log
