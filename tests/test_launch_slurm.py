"""``medfm launch --slurm``: the batch script is valid bash (``bash -n`` and a bash parser), and run against stub
``scontrol``/``srun`` it starts exactly one torchrun agent per node with the rendezvous on the allocation's first
node, the resolved config and the per-process environment. ``sbatch --test-only`` runs too where SLURM exists."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_pretrain_helpers import make_shards, run_config  # noqa: E402

from medfm.launch.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    shards = make_shards(tmp / "shards", n=8, modalities=("image", "text"))
    cfg = run_config(tmp / "unused", shards, [{"name": "mae:image"}], ("image",), batch=2, steps=4)
    del cfg["run_dir"]
    cfg["name"] = "big-run"
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        scripts = {}
        for kind, extra in (("gpu", []), ("cpu", ["--gpus-per-node", "0"])):
            out = tmp / f"{kind}.sbatch"
            rc = main(["launch", str(config), "train.steps=7", "--nnodes", "4", "--nproc-per-node", "8",
                       "--max-restarts", "2", "--slurm", str(out), "--sbatch", "partition=gpu",
                       "--sbatch", "time=24:00:00", *extra])
            assert rc == 0
            scripts[kind] = out
    finally:
        os.chdir(cwd)
    return tmp, scripts


def test_script_is_valid_bash(rendered):
    import bashlex

    _, scripts = rendered
    for path in scripts.values():
        subprocess.run(["bash", "-n", str(path)], check=True)
        text = path.read_text()
        # bashlex does not model $(( )) arithmetic; parse every other command line.
        lines = [line for line in text.replace("\\\n", " ").splitlines()
                 if line.strip() and not line.startswith("#") and "$((" not in line]
        for line in lines:
            assert bashlex.parse(line), line
        assert "#SBATCH --nodes=4" in text and "#SBATCH --ntasks-per-node=1" in text
        assert "#SBATCH --partition=gpu" in text and "#SBATCH --time=24:00:00" in text
    assert "#SBATCH --gpus-per-node=8" in scripts["gpu"].read_text()
    assert "--gpus-per-node" not in scripts["cpu"].read_text()


def _stub(bin_dir: Path, name: str, body: str) -> None:
    p = bin_dir / name
    p.write_text("#!/bin/bash\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_script_runs_one_torchrun_per_node(rendered, tmp_path, kind):
    tmp, scripts = rendered
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.args"
    _stub(bin_dir, "scontrol", '[ "$1 $2" = "show hostnames" ] && printf "gpu-node-07\\ngpu-node-08\\n"\n')
    _stub(bin_dir, "srun", f'printf "%s\\n" "$@" > {record}\n'
                           f'echo "OMP=$OMP_NUM_THREADS DS=${{DS_ACCELERATOR:-unset}}" >> {record}.env\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
           "SLURM_JOB_NUM_NODES": "4", "SLURM_CPUS_ON_NODE": "64", "HOME": str(tmp_path)}
    subprocess.run(["bash", str(scripts[kind])], env=env, check=True, capture_output=True, text=True, timeout=60)
    args = record.read_text().splitlines()
    assert args[:2] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    cmd = args[2:]
    assert cmd[0] == sys.executable and cmd[1:3] == ["-m", "torch.distributed.run"]
    pairs = dict(zip(cmd[3::1], cmd[4::1]))
    assert pairs["--nnodes"] == "4" and pairs["--nproc-per-node"] == "8" and pairs["--max-restarts"] == "2"
    assert pairs["--rdzv-backend"] == "c10d" and pairs["--rdzv-endpoint"] == "gpu-node-07:29500"
    assert pairs["--rdzv-id"] == "big-run" and pairs["--log-dir"] == str(tmp / "runs" / "big-run" / "logs")
    assert cmd[-3:] == ["-m", "medfm.launch.worker", str(tmp / "runs" / "big-run" / "config.yaml")]
    resolved = yaml.safe_load((tmp / "runs" / "big-run" / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 7  # the override reached the config every node reads
    env_line = Path(f"{record}.env").read_text().strip()
    assert env_line == ("OMP=8 DS=unset" if kind == "gpu" else "OMP=8 DS=cpu")


def test_elastic_range_refused_for_slurm(rendered, capsys):
    tmp, _ = rendered
    rc = main(["launch", str(tmp / "run.yaml"), "--nnodes", "2:4", "--slurm", str(tmp / "x.sbatch")])
    assert rc == 2 and "elastic range" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="no SLURM on this machine")
def test_sbatch_test_only(rendered):
    _, scripts = rendered
    subprocess.run(["sbatch", "--test-only", str(scripts["gpu"])], check=True, timeout=60)
