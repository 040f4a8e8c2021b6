"""Where a process sits in a job its launcher started: torchrun's variables, or a SLURM step's."""
from helpers.distributed import Placement, launched_placement, rendezvous_port, slurm_placement

STEP = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-02]", "MASTER_ADDR": "node01"}


def test_a_slurm_task_is_one_process_of_the_job():
    assert slurm_placement(STEP) == Placement(rank=3, world_size=4, local_rank=1, local_world_size=2,
                                              url=f"tcp://node01:{rendezvous_port('4242')}")
    assert slurm_placement({**STEP, "MASTER_PORT": "29500"}).url == "tcp://node01:29500"


def test_a_batch_script_or_a_single_task_is_not_a_distributed_job():
    assert slurm_placement({key: value for key, value in STEP.items() if key != "SLURM_STEP_ID"}) is None
    assert slurm_placement({**STEP, "SLURM_NTASKS": "1"}) is None


def test_the_command_line_wins_over_the_slurm_step(monkeypatch):
    for key, value in STEP.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert launched_placement(1, 1).world_size == 4
    assert launched_placement(8, 1) is None  # --num-gpus 8: this task spawns its own processes
    assert 20000 <= rendezvous_port("4242_7") < 40000
