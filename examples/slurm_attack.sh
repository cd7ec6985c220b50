#!/bin/bash
# The attack stage on a SLURM cluster: N nodes x K GPUs, one torchrun per node.
#
#   sbatch examples/slurm_attack.sh                     # profile "paper", its run folder
#   sbatch --nodes=4 examples/slurm_attack.sh paper     # more nodes: only the rows still
#                                                       # missing are attacked
#
# The run folder must be on a file system every node sees (all ranks write their chunks into
# it; rank 0 merges them). Run the data and training stages first (make stage STAGE=02_train
# PROFILE=paper). Afterwards, `make stage STAGE=03_attack PROFILE=paper` finds every chunk done
# and only merges and writes the executed notebook for the book.
#
#SBATCH --job-name=borderline-attack
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun per node; it starts the K workers
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail
PROFILE=${1:-paper}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}    # keep equal to --gres=gpu:K
cd "${SLURM_SUBMIT_DIR}"

# the first node hosts the rendezvous
HEAD=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)

srun .venv/bin/torchrun \
    --nnodes="${SLURM_NNODES}" \
    --nproc_per_node="${GPUS_PER_NODE}" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="${HEAD}:29500" \
    --rdzv-id="${SLURM_JOB_ID}" \
    -m lib.run.distributed attack --profile "${PROFILE}" \
        --threads $(( SLURM_CPUS_PER_TASK / GPUS_PER_NODE ))
