"""``python -m trainer [hydra overrides]``: train as configured by conf/ and the command line."""

from __future__ import annotations

# First, before torch and Hydra load (seconds): a preemption signal during start-up only sets a flag.
from trainer.signals import PreemptionSignals

PreemptionSignals.install()

import sys  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from trainer.config_io import HYDRA_MAIN, to_config  # noqa: E402
from trainer.errors import ConfigError
from trainer.entry import exit_config_error, run_hydra  # noqa: E402


@hydra.main(**HYDRA_MAIN)
def _run(cfg: DictConfig) -> None:
    from trainer.exits import EXIT_PREEMPTED, RunExit
    from trainer.distributed import rank_info, requeue_slurm_job
    from trainer.loop import train

    import torch.distributed as dist

    try:
        train(to_config(cfg))
        if dist.is_initialized():
            # Rank 0 may still be writing the HF export: leave the group together (a gloo group torn down on
            # one rank while its peer is still in it can abort the process at exit).
            dist.barrier()
    except RunExit as stop:
        # A deliberate stop (preemption, non-finite numbers, failed save): exit codes in README.
        print(f"meshtron: {stop}", file=sys.stderr, flush=True)
        if stop.code == EXIT_PREEMPTED and rank_info().is_main:
            # The very last act: `scontrol requeue` ends this job at once (TERM, then KILL after KillWait),
            # so everything else (logs, wandb, the checkpoint, committed on every rank) must be done by now.
            if dist.is_initialized():
                dist.destroy_process_group()
            for line in requeue_slurm_job():
                print(f"meshtron: {line}", file=sys.stderr, flush=True)
        sys.exit(stop.code)
    except ConfigError as err:
        # A configuration mistake or an unusable input file: say what to change, once, without a traceback.
        exit_config_error(err)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def usage() -> str:
    """meshtron's own short usage, printed before Hydra's generic --help: the groups and their presets."""
    from pathlib import Path

    import conf

    root = Path(conf.__file__).parent
    groups = [(d.name, sorted(f.stem for f in d.glob("*.yaml"))) for d in sorted(root.iterdir()) if d.is_dir()
              and any(d.glob("*.yaml"))]
    lines = ["usage: python -m trainer [group=preset ...] [key=value ...]",
             "       torchrun --nproc_per_node N -m trainer ...   (several processes; slurm/train.sbatch on Slurm)",
             "",
             "Train as conf/config.yaml composes it, changed by Hydra overrides. Groups and their presets:"]
    lines += [f"  {name:<12} {', '.join(presets)}" for name, presets in groups if name != "experiment"]
    lines += [f"  {'+experiment':<12} {', '.join(dict(groups).get('experiment', []))}  (bundles for real runs)",
              "",
              "Examples:",
              "  python -m trainer                                       # the tiny model on the bundled corpus (CPU)",
              "  python -m trainer model=tiny_moe trainer.max_steps=50   # a tiny mixture of experts",
              "  python -m trainer model=llama3_2_1b model.hf_path=/models/Llama-3.2-1B data.path=corpus.jsonl \\",
              "      data.format=jsonl_text trainer.precision=bf16",
              "  python -m trainer --cfg job                             # print the composed config, do not train",
              "",
              "Every key with its meaning: README.md, sections Configuration, Parallel training, Data, Checkpoints",
              "and resume. Hydra's own help follows.",
              ""]
    return "\n".join(lines)


def main() -> None:
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(usage(), flush=True)
    run_hydra(_run)  # Hydra's own override errors exit 2 in one line too


if __name__ == "__main__":
    main()
