# Cluster environment for slurm/train.sbatch, sourced by the batch shell before the launch (sbatch/srun pass
# it on to every task). Nothing is set by default: NCCL and the fabric pick their own settings, and the right
# values depend on the site. Uncomment and adapt what your cluster's documentation asks for.

# Threads per worker for CPU-side ops; torchrun otherwise sets 1 and warns.
# export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-8} / ${NPROC_PER_NODE:-1} ))}

# NCCL: which network interface carries bootstrap/socket traffic (see `ip addr` on a compute node).
# export NCCL_SOCKET_IFNAME=ib0          # or e.g. eth0, ^lo,docker (a leading ^ excludes)
# InfiniBand adapters (and ports) to use, from `ibv_devinfo`.
# export NCCL_IB_HCA=mlx5_0,mlx5_1
# Gloo (CPU collectives, the rendezvous) picks its interface separately.
# export GLOO_SOCKET_IFNAME=ib0
# Logging when a collective hangs or the fabric is not found: INFO, or WARN for less.
# export NCCL_DEBUG=INFO
# export NCCL_DEBUG_SUBSYS=INIT,NET
# A collective that hangs past trainer.dist_timeout_s already ends the process (torch's NCCL watchdog, default
# TORCH_NCCL_ASYNC_ERROR_HANDLING=3). To see where every rank was, dump torch's flight recorder on timeout
# (README, "When a GPU job hangs"); the directory must exist:
# export TORCH_FR_BUFFER_SIZE=2000 TORCH_NCCL_DUMP_ON_TIMEOUT=1 TORCH_FR_DUMP_TEMP_FILE=$PWD/fr/rank_

# Caches on fast local or shared storage instead of $HOME (tokenized data, HF downloads).
# export XDG_CACHE_HOME=/path/to/scratch/cache
# export HF_HOME=/path/to/scratch/hf

# wandb: offline unless a key is given; an offline run can be synced later with `wandb sync`.
# export WANDB_MODE=offline
