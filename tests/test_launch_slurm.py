"""``medfm launch --slurm``: the batch script is valid bash (``bash -n`` and a bash parser), and run against stub
``scontrol``/``srun`` it starts exactly one torchrun agent per node with the rendezvous on the allocation's first
node, the resolved config and the per-process environment. ``sbatch --test-only`` runs too where SLURM exists."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_support import make_shards, run_config  # noqa: E402

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
        for kind, extra in (("gpu", ["--gpus-per-node", "8"]), ("cpu", [])):
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
        # bashlex does not model $(( )) arithmetic: parse the whole script with each expansion as a number.
        assert bashlex.parse(re.sub(r"\$\(\(.*?\)\)", "1", text))
        assert "#SBATCH --nodes=4" in text and "#SBATCH --ntasks-per-node=1" in text
        assert "#SBATCH --partition=gpu" in text and "#SBATCH --time=24:00:00" in text
    assert "#SBATCH --gpus-per-node=8" in scripts["gpu"].read_text()


def test_cpu_run_asks_for_cpus_not_gpus(rendered):
    """Defect: without --gpus-per-node the script asked for --gpus-per-node=<nproc>, which sbatch refuses on a
    cluster without GPU GRES. A CPU run asks for CPUs (one per process unless --cpus-per-task says otherwise)."""
    _, scripts = rendered
    text = scripts["cpu"].read_text()
    assert "--gpus-per-node" not in text and "--gres" not in text
    assert "#SBATCH --cpus-per-task=8" in text and "export DS_ACCELERATOR=cpu" in text
    assert "#SBATCH --cpus-per-task" not in scripts["gpu"].read_text()


def test_log_directory_exists_when_the_script_is_written(rendered):
    """Defect: --output pointed into <run_dir>/logs/, which only the running script created; SLURM opens the output
    file before the script starts, so the job died at launch ("Could not open stdout file")."""
    _, scripts = rendered
    for path in scripts.values():
        out = next(line.split("=", 1)[1] for line in path.read_text().splitlines()
                   if line.startswith("#SBATCH --output="))
        assert Path(out).parent.is_dir(), out


def test_script_asks_for_warning_signal_and_requeue(rendered, tmp_path):
    tmp, scripts = rendered
    text = scripts["cpu"].read_text()
    assert "#SBATCH --signal=B:USR1@180" in text and "#SBATCH --requeue" in text
    assert "#SBATCH --open-mode=append" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    out = tmp_path / "lead.sbatch"
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        assert main(["launch", str(tmp / "run.yaml"), "name=lead", "--slurm", str(out), "--signal-lead", "0"]) == 0
        assert "#SBATCH --signal" not in out.read_text()
        assert main(["launch", str(tmp / "run.yaml"), "name=lead", "--slurm", str(out), "--signal-lead", "45",
                     "--cpus-per-task", "3"]) == 0
        assert "#SBATCH --signal=B:USR1@45" in out.read_text() and "#SBATCH --cpus-per-task=3" in out.read_text()
    finally:
        os.chdir(cwd)


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
           "SLURM_JOB_NUM_NODES": "4", "SLURM_CPUS_ON_NODE": "64", "HOME": str(tmp_path), "SLURM_JOB_ID": "4321"}
    if kind == "cpu":
        env["SLURM_CPUS_PER_TASK"] = "64"
    subprocess.run(["bash", str(scripts[kind])], env=env, check=True, capture_output=True, text=True, timeout=60)
    args = record.read_text().splitlines()
    assert args[:2] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    cmd = args[2:]
    if kind == "cpu":  # the step gets the batch's CPUs (srun does not inherit --cpus-per-task on every version)
        assert cmd[0] == "--cpus-per-task=64"
        cmd = cmd[1:]
    # torchrun, through the agent wrapper that keeps it alive on SIGUSR1 (launch/agent.py)
    assert cmd[0] == sys.executable and cmd[1:3] == ["-m", "medfm.launch.agent"]
    pairs = dict(zip(cmd[3::1], cmd[4::1]))
    assert pairs["--nnodes"] == "4" and pairs["--nproc-per-node"] == "8" and pairs["--max-restarts"] == "2"
    # one rendezvous port per job, so two jobs sharing a node never meet in one store
    assert pairs["--rdzv-backend"] == "c10d" and pairs["--rdzv-endpoint"] == "gpu-node-07:24321"
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


# --- against a real one-node SLURM cluster (tests/slurm_cluster.py) --------------------------------------------------

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"
# Long enough that a requeued attempt is still training at slurmctld's first time-limit check after it starts (every
# 30 s): the time-limit test needs the warning to land mid-run. ~0.07 s/step on 2 idle cores.
STEPS = 240
JOB_TIMEOUT = 300


def _tiny_args(shards: str, run_dir: Path, steps: int = STEPS) -> list[str]:
    """configs/tiny_cpu.yaml shrunk by overrides: these shards, no periodic checkpoints, every step logged."""
    return [str(TINY), f"data.sources=[{{path: {shards}}}]", f"run_dir={run_dir}", f"name={run_dir.name}",
            f"train.steps={steps}", "train.log_every=1", "train.peak_tflops=1", "checkpoint.every=0",
            "checkpoint.keep=5", "tracking.enabled=false"]


def _write_script(tmp: Path, run_dir: Path, shards: str, *extra: str) -> Path:
    out = tmp / f"{run_dir.name}.sbatch"
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        assert main(["launch", *_tiny_args(shards, run_dir), "--nproc-per-node", "2", "--slurm", str(out),
                     *extra]) == 0
    finally:
        os.chdir(cwd)
    return out


def _weights(run_dir: Path) -> dict:
    from medfm.pretrain.checkpoint import consolidate, model_state_dict

    return model_state_dict(consolidate(run_dir / "checkpoints"))


def _assert_same_weights(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    diff = {k: float((got[k] - want[k]).abs().max()) for k in want if not (got[k] == want[k]).all()}
    assert not diff, f"weights differ from the uninterrupted run: {diff}"


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("slurm_shards") / "shards", n=16, modalities=("image", "text"))


def test_bad_config_refused_before_submission(tmp_path, tiny_shards, capsys):
    out = tmp_path / "bad.sbatch"
    rc = main(["launch", *_tiny_args(tiny_shards, tmp_path / "bad"), "train.stepz=3", "--slurm", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "train.stepz" in err[0], err
    assert not out.exists() and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_dry_run_and_test_only_agree(slurm_cluster, tmp_path, tiny_shards, capsys):
    """``--slurm X --dry-run`` prints the script and writes nothing; the script written without --dry-run is that
    text, and SLURM accepts it (``sbatch --test-only``) for the CPUs it asks (on the old script: gres refused)."""
    from slurm_cluster import run

    run_dir = tmp_path / "dry"
    out = tmp_path / f"{run_dir.name}.sbatch"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["launch", *_tiny_args(tiny_shards, run_dir), "--nproc-per-node", "2", "--slurm", str(out),
                     "--dry-run"]) == 0
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert not out.exists() and not run_dir.exists()
    assert _write_script(tmp_path, run_dir, tiny_shards) == out
    text = out.read_text()
    assert printed.rstrip().endswith(text.rstrip()) and f"== {out} ==" in printed
    assert "== world ==" in printed and "world size 2" in printed
    proc = run("sbatch", "--test-only", str(out))
    # "sbatch: Job N to start at ... using 2 processors on nodes vm in partition debug"
    assert "using 2 processors" in proc.stderr, proc.stderr
    assert "#SBATCH --cpus-per-task=2" in text


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory, tiny_shards):
    """`medfm launch --slurm` writes the script, `sbatch -W` runs it: the uninterrupted run."""
    from slurm_cluster import run

    tmp = tmp_path_factory.mktemp("slurm_ref")
    run_dir = tmp / "tiny-ref"
    script = _write_script(tmp, run_dir, tiny_shards)
    proc = run("sbatch", "-W", "--parsable", str(script), timeout=JOB_TIMEOUT, check=False)
    return run_dir, script, proc


@pytest.mark.slow
def test_tiny_run_trains_under_sbatch(reference):
    from slurm_cluster import Job

    run_dir, script, proc = reference
    job = Job(proc.stdout.strip().split(";")[0])
    info = job.info()
    assert proc.returncode == 0 and info["JobState"] == "COMPLETED", job.log_tail(info)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{STEPS}"
    # The log is where the script's --output says, and holds the script's and every rank's lines.
    output = next(line.split("=", 1)[1] for line in script.read_text().splitlines()
                  if line.startswith("#SBATCH --output="))
    log = Path(output.replace("%j", job.id))
    assert info["StdOut"] == str(log) and log.is_file()
    assert "medfm: tiny-ref on 1 node(s)" in log.read_text() and "restart 0" in log.read_text()
    ranks = sorted(p.parent.name for p in (run_dir / "logs").glob("tiny-ref_*/attempt_0/*/stderr.log"))
    assert ranks == ["0", "1"]


@pytest.fixture(scope="module")
def preempted(slurm_cluster, tmp_path_factory, tiny_shards, reference):
    """One job through three attempts: SIGUSR1 by hand (``scancel --signal=USR1 --batch``) mid-run -> checkpoint ->
    requeue; the requeued attempt given a 1-minute time limit, whose warning signal (--signal-lead 40: at
    slurmctld's first check) lands mid-run -> checkpoint -> requeue; the last attempt, with time, finishes."""
    tmp = tmp_path_factory.mktemp("slurm_preempt")
    run_dir = tmp / "tiny-preempt"
    script = _write_script(tmp, run_dir, tiny_shards, "--signal-lead", "40", "--sbatch", "time=10")
    job = slurm_cluster.submit(script)
    metrics = run_dir / "metrics.jsonl"

    def steps_logged() -> int:
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    job.wait(lambda i: steps_logged() >= 3 or i["JobState"] in ("COMPLETED", "FAILED"), JOB_TIMEOUT, poll=0.2)
    signalled_at = steps_logged()
    from slurm_cluster import FINISHED, run

    run("scancel", "--signal=USR1", "--batch", job.id)
    # (requeued jobs wait SLURM's requeue delay, ~2 min, before they may start: release them at once)
    job.wait(lambda i: i["Restarts"] == "1" and i["JobState"] == "PENDING" or i["JobState"] in FINISHED,
             JOB_TIMEOUT)
    job.start_now(TimeLimit="1")
    job.wait(lambda i: i["Restarts"] == "2" and i["JobState"] == "PENDING" or i["JobState"] in FINISHED,
             JOB_TIMEOUT)
    job.start_now(TimeLimit="10")
    info = job.wait_finished(JOB_TIMEOUT)
    return run_dir, job, info, signalled_at


def _requeues(log: str) -> list[dict]:
    import json

    return [json.loads(line.split("medfm: ", 1)[1].rsplit("; requeueing", 1)[0])
            for line in log.splitlines() if "; requeueing job" in line]


@pytest.mark.slow
def test_usr1_checkpoints_at_the_next_step_and_requeues(preempted):
    run_dir, job, info, signalled_at = preempted
    log = job.log_tail(info, n=10**7)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log[-4000:]
    first = _requeues(log)[0]
    assert first["signal"] == "SIGUSR1" and signalled_at <= first["step"] < STEPS, (signalled_at, first)
    assert (run_dir / "checkpoints" / f"step{first['step']}" / "COMPLETE").is_file()
    assert "restart 0" in log and "restart 1" in log and "restart 2" in log
    resumed = [line for p in sorted((run_dir / "logs").glob("tiny-preempt_*/attempt_0/0/stderr.log"))
               for line in p.read_text().splitlines() if "resuming from" in line]
    assert any(line.endswith(f"step{first['step']}") for line in resumed), resumed


@pytest.mark.slow
def test_time_limit_checkpoints_and_requeues(preempted):
    run_dir, job, info, _ = preempted
    log = job.log_tail(info, n=10**7)
    marks = _requeues(log)
    assert len(marks) == 2, log[-4000:]
    # The second stop came from the time-limit warning (nothing else signalled attempt 1), mid-run.
    attempt1 = log.split("restart 1", 1)[1].split("restart 2", 1)[0]
    assert "caught SIGUSR1" in attempt1 and "TIME LIMIT" not in log
    assert marks[0]["step"] < marks[1]["step"] < STEPS, marks
    assert (run_dir / "checkpoints" / f"step{marks[1]['step']}" / "COMPLETE").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{STEPS}"


@pytest.mark.slow
def test_preempted_run_ends_with_the_uninterrupted_weights(preempted, reference):
    run_dir, job, info, _ = preempted
    assert info["JobState"] == "COMPLETED", job.log_tail(info)
    _assert_same_weights(_weights(run_dir), _weights(reference[0]))
