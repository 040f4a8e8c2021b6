"""Runs a plan of stand-in stages (tests/stage_tool.py) with the local executor, as tools/study.py
runs a study's: ``python tests/local_study.py PLAN.json``. The plan names the study folder, the
budget in cores, each kind's cores, and the stages (name, kind, seconds, needs)."""
import json
import sys
from pathlib import Path

from study_runner.config import get_study_cfg
from study_runner.local import Budget, run_local
from study_runner.stages import Stage

TOOL = Path(__file__).resolve().parent / "stage_tool.py"


def main(plan_file: str) -> int:
    plan = json.loads(Path(plan_file).read_text())
    cfg = get_study_cfg()
    cfg.OUTPUT_DIR = plan["output"]
    for kind, cores in plan["cores"].items():
        cfg.RESOURCES[kind.upper()].CPUS_PER_NODE = cores
        cfg.RESOURCES[kind.upper()].GPUS_PER_NODE = 0
    stages = []
    for stage in plan["stages"]:
        folder = Path(plan["output"]) / stage["name"]
        stages.append(Stage(stage["name"], stage["kind"],
                            (sys.executable, str(TOOL), "--seconds", str(stage["seconds"]), "--folder", str(folder)),
                            folder / "done.json", needs=tuple(stage.get("needs", ())), run_dir=folder))
    return run_local(stages, cfg, Budget(gpus=[], cpus=plan["cpus"]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
