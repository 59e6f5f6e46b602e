#!/usr/bin/env bash
# The issue-22 benchmark queue: one scripts/bench_rl.py process at a time, each finished run appended to
# results/bench_rl.json and skipped when this script runs again, so it resumes where it stopped (a run cut short is
# redone). Run it detached from the repository root, e.g.
#     setsid nohup scripts/bench_rl_queue.sh > rl_queue.log 2>&1 < /dev/null &
# and commit results/bench_rl.json as runs finish; `python scripts/bench_rl.py --part table` prints the tables.
# Nothing else should be timed on the machine while it runs.
set -u
cd "$(dirname "$0")/.."
python="${ENTREG_VENV:-.venv}/bin/python"
step() { echo "=== $(date -u +%FT%TZ) $*"; nice -n 10 "$python" scripts/bench_rl.py --threads 1 "$@"; }
short="--budget 204800 --eval-every 20480 --seeds 3"
long="--budget 1003520 --eval-every 20480 --seeds 3"  # ~1e6 env steps in whole 2048-step rollouts
sweep="--arms entreg_ppo_era entreg_ppo_matched_std --targets -1 -0.5 0 0.25"
# ERA's target sweep on the low-dimensional tasks, short budget first, then ~1e6 PPO steps
step --envs hopper $short $sweep
step --envs walker2d $short $sweep
step --envs hopper walker2d $long $sweep
# PPO, PPO+ERA and the matched-std control at ~1e6 steps on the four MuJoCo envs
step --envs hopper halfcheetah walker2d ant $long --arms entreg_ppo entreg_ppo_era entreg_ppo_matched_std
# ERA's released SAC with and without ERA, 1e5 steps, MuJoCo and DeepMind Control (2e5 updates a run: hours on CPU)
step --envs hopper halfcheetah dmc_cheetah_run --budget 100000 --eval-every 10000 --seeds 3 \
    --arms entreg_sac_authors entreg_sac_era_authors
echo "=== $(date -u +%FT%TZ) queue done"
