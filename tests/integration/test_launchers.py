"""Launchers: torchrun.sh really trains 2 ranks; its SLURM / multi-node argument mapping;
the SLURM script and the cluster definitions are well-formed."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.helpers import REPO, STEPS, reference_run, train_losses

TORCHRUN_SH = REPO / "launchers" / "torchrun.sh"


def dry_run(*args, env=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DPFACE_", "MASTER_"))}
    full.update(env or {})
    return subprocess.run(["bash", str(TORCHRUN_SH), "--dry-run", *args], env=full,
                          capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.multiproc
def test_torchrun_sh_trains_two_ranks(tmp_path_factory):
    run_dir = reference_run(tmp_path_factory)
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(len(v) == 1 for v in losses.values())  # one uninterrupted attempt
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == STEPS and "synthetic/acc" in final
    meta = json.loads((run_dir / "checkpoints" / f"step-{STEPS:08d}" / "meta.json").read_text())
    assert meta["world_size"] == 2
    timing = json.loads((run_dir.parent / "timing.json").read_text())
    print(f"\ntorchrun.sh, 2 ranks: launch -> first step {timing['first_step_s']:.1f} s, "
          f"total {timing['wall_s']:.1f} s")


def test_single_node_defaults_add_resume_auto():
    r = dry_run("--", "--config", "c.yaml", "train.lr=0.1")
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in cmd and cmd[cmd.index("--nproc-per-node") + 1] == "1"
    assert cmd[cmd.index("--max-restarts") + 1] == "0"
    assert cmd[cmd.index("dpface"):] == ["dpface", "train", "--resume", "auto", "--config", "c.yaml", "train.lr=0.1"]


def test_own_resume_is_kept():
    r = dry_run("--", "--config", "c.yaml", "--resume", "runs/x/checkpoints/step-00000010")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split().count("--resume") == 1 and "step-00000010" in r.stdout


def test_slurm_environment_fills_multi_node_arguments(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'gpu17\\ngpu18\\n'\n")
    (fake / "scontrol").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "gpu[17-18]", "SLURM_JOB_ID": "4242"}
    r = dry_run("--max-restarts", "3", "--", "--config", "c.yaml", env=env)
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    for flag, value in [("--nproc-per-node", "8"), ("--nnodes", "2"), ("--rdzv-backend", "c10d"),
                        ("--rdzv-endpoint", "gpu17:29500"), ("--rdzv-id", "4242"), ("--max-restarts", "3")]:
        assert cmd[cmd.index(flag) + 1] == value, flag
    assert "node 1 of 2" in r.stderr
    # Static rendezvous: fixed node rank and MASTER_ADDR-style endpoint from arguments.
    r = dry_run("--rdzv-backend", "static", "--nnodes", "2", "--node-rank", "1",
                "--rdzv-endpoint", "10.0.0.1:1234", "--", "--config", "c.yaml")
    cmd = r.stdout.split()
    for flag, value in [("--node-rank", "1"), ("--master-addr", "10.0.0.1"), ("--master-port", "1234")]:
        assert cmd[cmd.index(flag) + 1] == value, flag


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2", "--", "--config", "c.yaml"], "needs a rendezvous endpoint"),
    (["--", "train.lr=0.1"], "no --config"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1", "--", "--config", "c"], "not below nnodes"),
    (["--bogus", "--", "--config", "c"], "unknown launcher option '--bogus'"),
])
def test_launcher_errors_name_the_problem(args, message):
    r = dry_run(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_slurm_script_is_valid_bash_and_uses_torchrun_sh():
    text = (REPO / "launchers" / "slurm.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "launchers" / "slurm.sbatch")]).returncode == 0
    assert "#SBATCH --ntasks-per-node=1" in text and "srun" in text and "launchers/torchrun.sh" in text
    for var in ("NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
        assert f"export {var}" in text


def test_slurm_script_starts_torchrun_sh_with_the_head_node_as_rendezvous(tmp_path):
    """sbatch's part without SLURM: fake srun/scontrol record what the script starts."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'gpu17\\ngpu18\\n'\n")
    (fake / "srun").write_text(f"#!/bin/sh\necho \"$DPFACE_RDZV_ENDPOINT $NCCL_SOCKET_IFNAME\" > {tmp_path}/srun.txt\n"
                               f"echo \"$@\" >> {tmp_path}/srun.txt\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DPFACE_", "NCCL_"))}
    env.update(PATH=f"{fake}:{env['PATH']}", SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="7",
               SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[17-18]", SLURM_GPUS_ON_NODE="8")
    r = subprocess.run(["bash", str(REPO / "launchers" / "slurm.sbatch"), "configs/cpu_demo.yaml", "train.lr=0.2"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    first, second = (tmp_path / "srun.txt").read_text().splitlines()
    assert first == "gpu17:29500 ^docker,lo"
    assert "--ntasks-per-node=1" in second and "--kill-on-bad-exit=1" in second
    assert second.endswith("launchers/torchrun.sh --max-restarts 3 -- --config configs/cpu_demo.yaml train.lr=0.2")
    r = subprocess.run(["bash", str(REPO / "launchers" / "slurm.sbatch"), "nope.yaml"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "config file not found: nope.yaml" in r.stderr


def test_ray_launch_help_runs_without_ray_started():
    r = subprocess.run([sys.executable, str(REPO / "launchers" / "ray_launch.py"), "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--max-failures" in r.stdout and "--address" in r.stdout


def test_cluster_definitions_are_well_formed():
    ray_cluster = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    types = ray_cluster["available_node_types"]
    assert ray_cluster["head_node_type"] in types
    gpu_workers = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_workers and all(t["max_workers"] >= 1 for t in gpu_workers)
    assert any("torch==2.13.0" in c for c in ray_cluster["setup_commands"])
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay-raycluster.yaml").read_text()))
    rc = next(d for d in docs if d and d.get("kind") == "RayCluster")
    assert rc["apiVersion"].startswith("ray.io/")
    worker = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    limits = worker["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    shm = [v for v in worker["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert shm, "workers need a memory-backed /dev/shm (NCCL, data loader workers)"
    readme = (REPO / "cluster" / "README.md").read_text()
    for word in ("NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_IB_HCA", "hostNetwork", "/dev/shm",
                 "NCCL_DEBUG=INFO", "timeout"):
        assert word in readme, word


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_help_prints_the_usage():
    r = subprocess.run(["bash", str(TORCHRUN_SH), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--rdzv-endpoint" in r.stdout and "SLURM" in r.stdout
