"""``medfm sweep`` backends: the slurm backend's scripts are valid bash (``bash -n`` and bashlex) and are submitted
through a stub ``sbatch`` (one training job per point, one evaluation job ``afterok`` it; a rerun does not submit
twice); ``emit`` prints runnable launch commands; two local points run side by side (their training intervals
overlap) and their ``train_flops`` is the trainer's recorded value; ``medfm sweep status`` reads the run dirs."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

from medfm.launch.cli import main  # noqa: E402
from medfm.launch.sweep import load_sweep, parallel_slots, plan_points, read_metrics  # noqa: E402


def _setup(tmp, **extra):
    shards = make_shards(tmp / "shards", n=16, modalities=("image",))
    cfg = run_config(tmp / "unused", shards, [{"name": "mae:image"}], ("image",), batch=2, steps=4,
                     train={"strategy": "ddp"}, checkpoint={"every": 0, "keep": 1, "final": True})
    del cfg["run_dir"]
    base = tmp / "base.yaml"
    base.write_text(yaml.safe_dump(cfg))
    sweep = {"name": "sw", "base": str(base), "out": str(tmp / "out"), "nproc_per_node": 1,
             "sizes": [{"name": "w16", "overrides": {"model.towers.image.overrides.width": 16}}],
             "budgets": [{"name": "d4", "samples": 4}, {"name": "d8", "samples": 8}],
             "eval": {"split": "train", "max_batches": 2}, **extra}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _bash_ok(text: str) -> None:
    import bashlex

    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    # The whole script (multi-line traps and loops), as tests/test_launch_slurm.py parses it: bashlex does not
    # model $(( )) arithmetic, so each expansion stands as a number.
    assert bashlex.parse(re.sub(r"\$\(\(.*?\)\)", "1", text))


def _stub(bin_dir: Path, name: str, body: str) -> None:
    p = bin_dir / name
    p.write_text("#!/bin/bash\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


def test_slurm_dry_run_prints_valid_scripts(tmp_path, capsys):
    path = _setup(tmp_path, backend="slurm", slurm={"nnodes": 2, "gpus_per_node": 0, "sbatch": ["partition=cpu"]})
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    scripts = [s.split("\n", 1)[1] for s in out.split("### ")[1:]]
    assert len(scripts) == 4  # training + evaluation script per point
    for text in scripts:
        _bash_ok(text)
    train, fin = scripts[0], scripts[1]
    assert "#SBATCH --nodes=2" in train and "#SBATCH --partition=cpu" in train and "--gpus-per-node" not in train
    assert "medfm.launch.agent" in train and "export DS_ACCELERATOR=cpu" in train  # torchrun, USR1-proof
    assert "--finalize w16__d4" in fin and "#SBATCH --partition=cpu" in fin
    assert not (tmp_path / "out").exists()  # a dry run writes and submits nothing


def test_slurm_submits_through_sbatch_once(tmp_path, capsys):
    path = _setup(tmp_path, backend="slurm", slurm={"gpus_per_node": 0})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch.calls"
    # Stub sbatch: records its argv, answers a job id as --parsable does ("id;cluster").
    _stub(bin_dir, "sbatch", f'n=$(( $(cat {record} 2>/dev/null | wc -l) + 100 ))\n'
                             f'echo "$*" >> {record}\necho "$n;cluster"\n')
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}:{old}"
    try:
        assert main(["sweep", str(path)]) == 0
        calls = record.read_text().splitlines()
        assert len(calls) == 4
        assert calls[0] == f"--parsable {tmp_path / 'out' / 'slurm' / 'w16__d4.sbatch'}"
        assert calls[1] == f"--parsable --dependency=afterok:100 {tmp_path / 'out' / 'slurm' / 'w16__d4.finalize.sbatch'}"
        assert calls[3].startswith("--parsable --dependency=afterok:102 ")
        info = json.loads((tmp_path / "out" / "runs" / "w16__d4" / "slurm.json").read_text())
        assert info["train_job"] == "100" and info["finalize_job"] == "101"
        # The training job reads the resolved config the script names, with the point's step count.
        cfg = yaml.safe_load((tmp_path / "out" / "runs" / "w16__d8" / "config.yaml").read_text())
        assert cfg["train"]["steps"] == 4 and cfg["name"] == "w16__d8"
        for script in (tmp_path / "out" / "slurm").iterdir():
            _bash_ok(script.read_text())
        rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
        assert [r["status"] for r in rows] == ["submitted", "submitted"]
        capsys.readouterr()
        assert main(["sweep", str(path)]) == 0  # a rerun does not submit queued points again
        assert len(record.read_text().splitlines()) == 4 and "already submitted" in capsys.readouterr().out
        assert main(["sweep", str(path), "--resubmit", "--only", "w16__d8"]) == 0
        assert len(record.read_text().splitlines()) == 6
    finally:
        os.environ["PATH"] = old


def test_emit_prints_launch_commands(tmp_path, capsys):
    path = _setup(tmp_path)
    assert main(["sweep", str(path), "--backend", "emit"]) == 0
    out = capsys.readouterr().out
    cmds = [line for line in out.replace("\\\n", " ").splitlines() if line and not line.startswith("#")]
    assert len(cmds) == 2
    for c in cmds:
        _bash_ok(c)
        words = shlex.split(c)
        assert words[1:4] == ["-m", "medfm.launch.cli", "launch"] and "&&" in words
        assert words[-2:][0] == "--finalize"
    assert "train.steps=2" in cmds[0] and "train.steps=4" in cmds[1]


def test_parallel_slots_fit_the_cores():
    assert parallel_slots(4, 2, cores=8) == 4
    assert parallel_slots(4, 2, cores=4) == 2
    assert parallel_slots(3, 8, cores=4) == 1


@pytest.mark.slow
def test_two_local_points_run_side_by_side(tmp_path, capsys):
    path = _setup(tmp_path, max_parallel=2)
    assert main(["sweep", str(path)]) == 0
    rows = {r["name"]: r for r in csv.DictReader((tmp_path / "out" / "results.csv").open())}
    assert [r["status"] for r in rows.values()] == ["done", "done"]
    a, b = rows["w16__d4"], rows["w16__d8"]
    assert a["started"] < b["finished"] and b["started"] < a["finished"], (a, b)  # the intervals overlap
    sweep, base = load_sweep(path)
    for p in plan_points(sweep, base):
        row = rows[p.point.name]
        last = read_metrics(p.run_dir)[p.facts["steps"]]
        # train_flops is what the trainer recorded; for an all-MAE run it equals the a-priori planned value.
        assert float(row["train_flops"]) == pytest.approx(last["train_flops"], rel=1e-12)
        assert float(row["train_flops"]) == pytest.approx(float(row["planned_train_flops"]), rel=1e-9)
        assert float(row["eval_loss/mae:image"]) > 0
    capsys.readouterr()
    assert main(["sweep", "status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "w16__d8" in out and "2/2 points done" in out and " 4/4 " in out
    assert main(["sweep", str(path)]) == 0  # rerun: nothing to do, both stay done
    assert "2/2 points done" in capsys.readouterr().out


def test_train_flops_is_what_the_trainer_recorded(tmp_path, monkeypatch, capsys):
    """The sweep's x-axis is the trainer's train_flops (here a counter-source value 3x the planned one, as for
    contrastive heads the analytic formula does not see), not the sweep's own a-priori count."""
    import medfm.launch.sweep as sweep_mod

    path = _setup(tmp_path)
    real_run = subprocess.run

    def fake_run(argv, *args, **kwargs):
        if "launch" in argv:  # the trainer: metrics.jsonl with its cumulative train_flops, and a checkpoint
            run_dir = Path(next(a for a in argv if a.startswith("run_dir=")).split("=", 1)[1])
            steps = int(next(a for a in argv if a.startswith("train.steps=")).split("=", 1)[1])
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            with (run_dir / "metrics.jsonl").open("w") as fh:
                for s in range(1, steps + 1):
                    fh.write(json.dumps({"step": s, "loss/total": 1.0 / s, "train_flops": 3000.0 * s,
                                         "samples_seen": 2 * s}) + "\n")
            return subprocess.CompletedProcess(argv, 0)
        if "medfm.launch.evaluate" in argv:
            out = json.dumps({"losses": {"mae:image": 0.5}, "total": 0.5, "batches": 1, "samples": 2, "split": "val"})
            return subprocess.CompletedProcess(argv, 0, stdout=out + "\n", stderr="")
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(sweep_mod.subprocess, "run", fake_run)
    assert main(["sweep", str(path)]) == 0
    rows = {r["name"]: r for r in csv.DictReader((tmp_path / "out" / "results.csv").open())}
    assert float(rows["w16__d4"]["train_flops"]) == 6000.0 and float(rows["w16__d8"]["train_flops"]) == 12000.0
    assert float(rows["w16__d8"]["flops_per_sample"]) == 1500.0
    assert float(rows["w16__d8"]["planned_train_flops"]) != 12000.0


def test_sweep_scripts_pass_sbatch_test_only(slurm_cluster, tmp_path, capsys):
    path = _setup(tmp_path, backend="slurm", slurm={"gpus_per_node": 0})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "sbatch", 'echo "1;c"\n')  # write the scripts without queueing anything
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}:{old}"
    try:
        assert main(["sweep", str(path), "--only", "w16__d4"]) == 0
    finally:
        os.environ["PATH"] = old
    for script in sorted((tmp_path / "out" / "slurm").iterdir()):
        proc = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (script.name, proc.stderr)


@pytest.mark.slow
def test_slurm_backend_runs_on_a_real_cluster(slurm_cluster, tmp_path):
    """Training job (srun + torchrun from launch/slurm.py's script) then the afterok evaluation job, on whatever
    SLURM cluster this machine has (CPU nodes): the point ends done in results.csv with the trainer's FLOPs."""
    import time

    path = _setup(tmp_path, backend="slurm", slurm={"gpus_per_node": 0})
    sweep = yaml.safe_load(path.read_text())
    sweep["budgets"] = sweep["budgets"][:1]
    sweep["eval"]["split"] = "train"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(path)]) == 0
    results = tmp_path / "out" / "results.csv"

    def rows():
        return list(csv.DictReader(results.open()))

    deadline = time.time() + 600
    while rows()[0]["status"] != "done" and time.time() < deadline:  # the evaluation job rewrites results.csv
        time.sleep(5)
    logs = sorted((tmp_path / "out" / "runs" / "w16__d4" / "logs").glob("slurm-*.out"))
    row = rows()[0]
    assert row["status"] == "done", [p.read_text()[-500:] for p in logs]
    assert float(row["train_flops"]) == float(row["planned_train_flops"]) and float(row["eval_loss"]) > 0
