#!/bin/bash
# A stevedore batch job split over a Slurm job array of 4 tasks: task i runs shard i/4
# (stevedore reads SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT).
# Every task reads the same input and writes its own output; concatenate them at the end:
#   cat results-*.jsonl > results.jsonl
# Resubmitting the array (or one task, e.g. --array=2) resumes: answered requests are skipped.
#SBATCH --job-name=stevedore-batch
#SBATCH --array=0-3
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --output=stevedore-batch-%a.log
set -euo pipefail

stevedore batch \
  --model /models/Qwen3-30B-A3B \
  --input requests.jsonl \
  --output "results-${SLURM_ARRAY_TASK_ID}.jsonl" \
  --host-cache 25% --max-batch 64 --json-progress
