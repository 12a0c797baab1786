"""``python -m trainer.launch [hydra overrides]``: check a run against its Slurm allocation, render
``slurm/train.sbatch`` for it and submit it.

The config is composed exactly as ``python -m trainer`` composes it (same Hydra entry, same overrides); the
``launcher`` group says how many nodes and GPUs, how long, and how to set up the environment. Before anything
is written or submitted: every config check of a training run at world size nodes x gpus_per_node, and
that number against the mesh. The rendered script carries the overrides (minus ``launcher.*``) and a pinned
``trainer.output_dir``, so it is self-contained and a requeued job finds the same output directory.
"""

from __future__ import annotations

import getpass
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig

from trainer.config import Config, LauncherConfig, ParallelConfig
from trainer.config_io import HYDRA_MAIN, is_secret_key, to_config
from trainer.errors import ConfigError
from trainer.entry import exit_config_error, run_hydra

SETUP_MARKERS = ("# >>> meshtron setup", "# <<< meshtron setup")
OVERRIDES_MARKERS = ("# >>> meshtron overrides", "# <<< meshtron overrides")
_SBATCH_LINE = re.compile(r"^#SBATCH\s+(--[A-Za-z0-9-]+)(?:=(.*?))?\s*$")
DEFAULT_LOG_NAME = "%x-%j.out"


class LaunchError(Exception):
    """Launching failed for a reason outside the config (no sbatch, no template, sbatch refused)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------- checks


def check_world(p: ParallelConfig, lc: LauncherConfig) -> int:
    """nodes x gpus_per_node against the mesh's product; returns the world size. Names both numbers and what
    to change, since a mismatch would otherwise only surface after the job waited in the queue."""
    p.validate()
    world = lc.nodes * lc.gpus_per_node
    alloc = f"launcher.nodes={lc.nodes} x launcher.gpus_per_node={lc.gpus_per_node} = {world} GPUs"
    others = p.dp_replicate * p.tp * p.pp * p.cp
    fixed = f"dp_replicate={p.dp_replicate} x tp={p.tp} x pp={p.pp} x cp={p.cp}"
    if p.dp_shard == -1:
        if world % others:
            raise ConfigError(f"{alloc}, but the parallel mesh needs a multiple of {others} ranks ({fixed}, "
                              f"dp_shard=-1 takes the rest); make nodes x gpus_per_node a multiple of {others} "
                              f"or change the parallel degrees")
        return world
    mesh = others * p.dp_shard
    if mesh != world:
        hint = (f" (e.g. launcher.nodes={mesh // lc.gpus_per_node})" if mesh % lc.gpus_per_node == 0 else "")
        raise ConfigError(f"{alloc}, but the parallel mesh has {mesh} ranks ({fixed} x dp_shard={p.dp_shard}); "
                          f"set launcher.nodes x launcher.gpus_per_node to {mesh}{hint}, or change parallel.* "
                          f"to multiply to {world} (parallel.dp_shard=-1 fills whatever the others leave)")
    return world


def job_overrides(overrides: list[str], output_dir: Path) -> list[str]:
    """The user's overrides for the job: ``launcher.*`` dropped, secrets refused, output_dir pinned.

    ``trainer.output_dir`` defaults to a timestamp resolved at start-up: a requeued job would start a new
    directory instead of resuming, so the directory resolved here is written into the script.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    kept = []
    for line, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        key = parsed.key_or_group
        if key.split(".")[0] == "launcher":
            continue
        if is_secret_key(key):
            raise ConfigError(f"{key} is a secret: on the command line of trainer.launch it would be written into "
                              f"the sbatch script and Slurm's job records. Export it instead (sbatch passes your "
                              f"environment to the job), e.g. `export WANDB_API_KEY=...` before launching")
        if key == "trainer.output_dir":
            continue
        kept.append(line)
    return kept + [f"trainer.output_dir={output_dir}"]


def refuse_secrets_in_script(lc: LauncherConfig) -> None:
    """launcher.setup and extra_sbatch go into the script verbatim: no `export WANDB_API_KEY=...` there."""
    for where, text in (("launcher.setup", lc.setup or ""), ("launcher.extra_sbatch", " ".join(lc.extra_sbatch))):
        for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", text):
            if is_secret_key(name):
                raise ConfigError(f"{where} sets {name}: a secret would be written into the sbatch script; export "
                                  f"it in your shell before launching instead (sbatch passes your environment on)")


def template_path(lc: LauncherConfig) -> Path:
    if lc.template:
        path = Path(lc.template).expanduser()
        if not path.is_file():
            raise LaunchError(f"launcher.template={lc.template!r}: no such file", code=2)
        return path
    import trainer

    path = Path(trainer.__file__).resolve().parents[1] / "slurm" / "train.sbatch"
    if not path.is_file():
        raise LaunchError(f"no sbatch template at {path}: slurm/train.sbatch ships with the meshtron repository, "
                          f"not inside the trainer package (a non-editable install?). Pass "
                          f"launcher.template=/path/to/meshtron/slurm/train.sbatch, or install with pip install -e",
                          code=2)
    return path


# ------------------------------------------------------------------------------------------ render


def log_dir(lc: LauncherConfig, output_dir: Path) -> Path:
    return Path(lc.log_dir).expanduser().resolve() if lc.log_dir else output_dir / "logs"


def _block(lines: list[str], markers: tuple[str, str], where: Path) -> tuple[int, int]:
    """Indices of the two marker lines of a template block."""
    starts = [i for i, ln in enumerate(lines) if ln.strip() == markers[0]]
    ends = [i for i, ln in enumerate(lines) if ln.strip() == markers[1]]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise LaunchError(f"{where} is not a meshtron sbatch template: it needs exactly one "
                          f"'{markers[0]}' ... '{markers[1]}' block", code=2)
    return starts[0], ends[0]


def _header(lines: list[str], lc: LauncherConfig, logs: Path, where: Path) -> list[str]:
    """#SBATCH values from ``lc``: template lines rewritten in place, the others added after the last one."""
    outputs = [m.group(2) for m in map(_SBATCH_LINE.match, lines) if m and m.group(1) == "--output" and m.group(2)]
    values: dict[str, object] = {  # True: a flag; None: drop the template's line
        "--job-name": lc.job_name, "--nodes": lc.nodes, "--gpus-per-node": lc.gpus_per_node, "--time": lc.time,
        "--output": logs / Path(outputs[0] if outputs else DEFAULT_LOG_NAME).name,
        "--signal": f"B:USR1@{lc.signal_seconds}",
        "--requeue": True if lc.requeue else None, "--no-requeue": None if lc.requeue else True,
        "--partition": lc.partition, "--account": lc.account, "--cpus-per-task": lc.cpus_per_task,
        "--ntasks-per-node": lc.gpus_per_node if lc.mode == "srun" else None,
    }
    keep_template = {"--partition", "--account", "--cpus-per-task", "--ntasks-per-node"}  # when None here

    def line(opt: str, value: object) -> str:
        return f"#SBATCH {opt}" if value is True else f"#SBATCH {opt}={value}"

    out, seen, last = [], set(), -1
    for ln in lines:
        m = _SBATCH_LINE.match(ln)
        opt = m.group(1) if m else None
        if opt in values:
            seen.add(opt)
            if values[opt] is not None:
                ln = line(opt, values[opt])
            elif opt not in keep_template:
                continue
        out.append(ln)
        if ln.startswith("#SBATCH"):
            last = len(out) - 1
    if last < 0:
        raise LaunchError(f"{where} has no #SBATCH lines: not an sbatch template", code=2)
    added = [line(opt, v) for opt, v in values.items() if opt not in seen and v is not None]
    added += ["#SBATCH " + opt.strip().removeprefix("#SBATCH").strip() for opt in lc.extra_sbatch]
    return out[:last + 1] + added + out[last + 1:]


def render(template: str, lc: LauncherConfig, overrides: list[str], logs: Path, where: Path = Path("template"),
           home: Optional[Path] = None) -> str:
    """The template with its #SBATCH values from ``lc``, its setup block from ``lc.setup`` (None: the
    template's own) and its overrides block set to ``set -- <overrides> "$@"``, each shell-quoted. ``home``:
    the checkout whose slurm/env.sh the job sources (MESHTRON_HOME), wherever sbatch is run from."""
    out = _header(template.splitlines(), lc, logs, where)
    s, e = _block(out, SETUP_MARKERS, where)
    setup = lc.setup.rstrip("\n").splitlines() if lc.setup is not None else out[s + 1:e]
    if home is not None:
        setup = [*setup, f"export MESHTRON_HOME=${{MESHTRON_HOME:-{shlex.quote(str(home))}}}"]
    python = lc.python or (sys.executable if lc.setup is None else None)
    if python:
        setup = [*setup, f"export PYTHON={shlex.quote(python)}"]
    if lc.mode == "srun":
        setup = [*setup, "export MESHTRON_LAUNCH=srun  # launcher.mode=srun: one task per GPU, no torchrun"]
    out = out[:s + 1] + setup + out[e:]
    s, e = _block(out, OVERRIDES_MARKERS, where)
    quoted = ["set -- \\"] + [f"  {shlex.quote(o)} \\" for o in overrides] + ['  "$@"']
    out = out[:s + 1] + quoted + out[e:]
    return "\n".join(out) + "\n"


def log_file(pattern: Path, job_id: str, job_name: str) -> Path:
    """Slurm's filename pattern (%j, %A, %x, %u, %%) for the batch step's log of this job."""
    subs = {"j": job_id, "A": job_id, "J": job_id, "x": job_name, "u": getpass.getuser(), "%": "%"}
    return Path(re.sub(r"%([jAJxu%])", lambda m: subs[m.group(1)], str(pattern)))


# ------------------------------------------------------------------------------------------- submit


def find_sbatch() -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError("sbatch is not on PATH: run trainer.launch on a Slurm login node, or use "
                          "launcher.dry_run=true to print the script and submit it yourself")
    return sbatch


def submit(script: Path, sbatch: str) -> str:
    """sbatch --parsable: prints "<job id>" or "<job id>;<cluster>"."""
    proc = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise LaunchError(f"sbatch refused {script} (exit {proc.returncode}): {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise LaunchError(f"sbatch --parsable printed {proc.stdout.strip()!r}, not a job id")
    return job_id


def launch(cfg: Config, overrides: list[str]) -> int:
    from trainer.loop import prepare

    lc = cfg.launcher
    lc.validate()
    output_dir = Path(cfg.trainer.output_dir).expanduser().resolve()
    args = job_overrides(overrides, output_dir)
    refuse_secrets_in_script(lc)
    world = check_world(cfg.parallel, lc)
    prepare(cfg, world)  # every rule a training run at this world size checks, before anything is written
    tpl = template_path(lc)
    logs = log_dir(lc, output_dir)
    script = render(tpl.read_text(), lc, args, logs, where=tpl, home=tpl.resolve().parents[1])
    if lc.dry_run:
        sys.stdout.write(script)
        return 0
    sbatch = find_sbatch()  # before anything is written
    path = output_dir / "launch" / "train.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)  # Slurm does not create the --output directory
    path.write_text(script)
    job_id = submit(path, sbatch)
    log_name = next(m.group(2) for m in map(_SBATCH_LINE.match, script.splitlines()) if m and m.group(1) == "--output")
    log = log_file(Path(log_name), job_id, lc.job_name)
    print(f"meshtron: submitted job {job_id} ({lc.nodes} node(s) x {lc.gpus_per_node} GPUs), script {path}")
    print(f"meshtron: logs: {log}")
    print(f"meshtron: outputs: {output_dir}")
    print(f"meshtron: watch: squeue -j {job_id}; tail -f {shlex.quote(str(log))}")
    return 0


@hydra.main(**HYDRA_MAIN)
def _run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    try:
        sys.exit(launch(to_config(cfg), overrides))
    except ConfigError as err:
        exit_config_error(err)
    except LaunchError as err:
        print(f"meshtron: {err}", file=sys.stderr)
        sys.exit(err.code)


def main() -> None:
    # `--dry-run` is short for the override launcher.dry_run=true.
    sys.argv = [("launcher.dry_run=true" if a == "--dry-run" else a) for a in sys.argv]
    run_hydra(_run)  # Hydra's own override errors exit 2 in one line too, before anything is submitted


if __name__ == "__main__":
    main()
