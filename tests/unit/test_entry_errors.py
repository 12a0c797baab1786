"""trainer/entry.py: configuration errors, Hydra's own included, as one line naming the override; printed by one
rank only, written into torchrun's per-rank error file, exit 2 (no process group here)."""

from __future__ import annotations

import json
import signal

import pytest
from hydra.errors import HydraException

from trainer import entry
from trainer.entry import EXIT_CONFIG, exit_config_error, hydra_error_line, run_hydra

GRAMMAR = "https://hydra.cc/docs/1.2/advanced/override_grammar/basic"


def hydra_error(compose, *overrides: str) -> HydraException:
    with pytest.raises(HydraException) as err:
        compose(*overrides)
    return err.value


@pytest.mark.parametrize("overrides,line", [
    (["trainer.max_steps=2", "trainer.maxsteps=3"],
     "override 'trainer.maxsteps=3': trainer.maxsteps is not a config key (Key 'maxsteps' not in 'TrainerConfig'); "
     "`python -m trainer --cfg job` prints every key"),
    (["trainer.max_steps=abc"],
     "override 'trainer.max_steps=abc': trainer.max_steps: Value 'abc' of type 'str' could not be converted to "
     "Integer"),
    (["logging.wandb=maybe"],
     "override 'logging.wandb=maybe': logging.wandb: Value 'maybe' is not a valid bool (type str)"),
    (["trainer.max_steps=[1"], f"cannot parse the override 'trainer.max_steps=[1': no viable alternative at input "
                               f"'[1' (the syntax: {GRAMMAR})"),
    (["trainer.max_steps"], f"cannot parse the override 'trainer.max_steps': missing EQUAL at '<EOF>' (the syntax: "
                            f"{GRAMMAR})"),
])
def test_hydra_errors_become_one_line_naming_the_override(compose, overrides, line):
    assert hydra_error_line(hydra_error(compose, *overrides), overrides) == line


def test_a_missing_group_option_lists_the_options(compose):
    line = hydra_error_line(hydra_error(compose, "parallel=nosuch"), ["parallel=nosuch"])
    assert line.startswith("override 'parallel=nosuch': there is no parallel config 'nosuch'; choose one of ")
    options = line.split("choose one of ")[1].split(", ")
    assert "fsdp" in options and "single" in options and "base_parallel" not in options


def test_run_hydra_turns_hydra_errors_into_exit_2(compose, monkeypatch, capsys):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr("sys.argv", ["trainer", "trainer.maxsteps=3"])
    seen = {}

    def main():
        seen["full_error"] = entry.os.environ.get("HYDRA_FULL_ERROR")  # Hydra raises instead of exiting 1
        compose("trainer.maxsteps=3")

    with pytest.raises(SystemExit) as done:
        run_hydra(main)
    assert done.value.code == EXIT_CONFIG and seen["full_error"] == "1"
    err = capsys.readouterr().err
    assert err.startswith("meshtron: configuration error: override 'trainer.maxsteps=3'") and err.count("\n") == 1
    assert "HYDRA_FULL_ERROR" not in entry.os.environ  # restored

    # A user who asked for Hydra's full error gets it, untouched.
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(HydraException):
        run_hydra(main)


@pytest.fixture
def sigterm():
    """exit_config_error ignores SIGTERM under a launcher; put this process' handler back afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False)])
def test_under_torchrun_one_rank_prints_and_every_rank_records(tmp_path, monkeypatch, capsys, sigterm, rank, printed):
    error_file = tmp_path / "error.json"
    for name, value in {"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank,
                        "TORCHELASTIC_ERROR_FILE": str(error_file)}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as done:
        exit_config_error("parallel.tp=3 does not divide\n  the world size 2")
    line = "meshtron: configuration error: parallel.tp=3 does not divide the world size 2"
    assert done.value.code == 2
    assert capsys.readouterr().err == (line + "\n" if printed else "")
    # The layout torch's ErrorHandler writes: torchrun's summary shows py_callstack as the rank's traceback.
    recorded = json.loads(error_file.read_text())["message"]
    assert recorded["message"] == recorded["extraInfo"]["py_callstack"] == line
    assert int(recorded["extraInfo"]["timestamp"]) > 0
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # a launcher's SIGTERM cannot turn 2 into -15


def test_a_single_process_prints_and_keeps_its_sigterm(monkeypatch, capsys, sigterm):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "TORCHELASTIC_ERROR_FILE"):
        monkeypatch.delenv(name, raising=False)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as done:
        exit_config_error(ValueError("bad"), prog="meshtron verify")
    assert done.value.code == 2 and capsys.readouterr().err == "meshtron verify: configuration error: bad\n"
    assert signal.getsignal(signal.SIGTERM) == before
