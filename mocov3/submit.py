"""``mocov3 submit``: run a mocov3 command on SLURM through submitit, one task per GPU, requeued on
preemption or timeout.

Each task sets the environment ``torch.distributed`` reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and runs ``python -m mocov3 <command>`` as a child process. When SLURM announces preemption or
the time limit (submitit's signal, ``--signal-delay`` seconds ahead), submitit calls
:meth:`TrainingTask.checkpoint`: the child gets SIGTERM, saves a checkpoint after its current step and
exits; the job is requeued with the same command, which resumes from the run folder. ``submitit`` is an
optional dependency (``pip install 'mocov3[slurm]'``).
"""
from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

from .runtime import ConfigError, first_line


def parse_time(text: str) -> float:
    """SLURM's ``[days-]hours:minutes:seconds`` (or minutes) -> minutes (SLURM gets them rounded up)."""
    try:
        days, _, rest = text.rpartition("-")
        parts = [int(p) for p in rest.split(":")]
        if len(parts) == 1:
            minutes = float(parts[0])
        else:
            while len(parts) < 3:
                parts.append(0)
            h, m, s = parts[:3]
            minutes = h * 60 + m + s / 60
        minutes += int(days or 0) * 24 * 60
    except ValueError:
        raise ConfigError(f"--time {text!r} is not [days-]hours:minutes:seconds") from None
    if minutes <= 0:
        raise ConfigError(f"--time {text!r} is not a positive duration")
    return minutes


def master_port(job_id: str) -> int:
    """A port from the job id: the same for every task of the job and for its requeued runs."""
    return 20000 + int(hashlib.sha1(str(job_id).encode()).hexdigest(), 16) % 20000


class TrainingTask:
    """One task of the job (one GPU): a checkpointable callable in submitit's sense."""

    def __init__(self, argv: Sequence[str]):
        self.argv = list(argv)
        self.proc: Optional[subprocess.Popen] = None

    def _dist_env(self) -> dict:
        import submitit

        env = submitit.JobEnvironment()
        hosts = getattr(env, "hostnames", None) or ["127.0.0.1"]
        return {"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank),
                "LOCAL_WORLD_SIZE": str(max(1, env.num_tasks // max(1, env.num_nodes))),
                "MASTER_ADDR": "127.0.0.1" if hosts[0] in ("localhost",) else hosts[0],
                "MASTER_PORT": str(master_port(env.job_id))}

    def __call__(self) -> int:
        # SLURM sends its time-limit warning (--signal-delay) to every process of the step, the run included:
        # the run ignores it (SIG_IGN survives exec) and waits for the SIGTERM of checkpoint() below, which
        # comes once submitit has taken the warning; left at its default, SIGUSR2 would kill the run unsaved
        self.proc = subprocess.Popen([sys.executable, "-m", "mocov3", *self.argv],
                                     env={**os.environ, **self._dist_env()}, preexec_fn=_ignore_usr2)
        # poll rather than Popen.wait(): submitit's signal handler (checkpoint, below) runs in this thread
        # and waits for the child itself; inside a blocking wait() it would wait for wait()'s own lock
        while (rc := self.proc.poll()) is None:
            time.sleep(0.2)
        if rc == 0:
            # done: a time-limit warning that arrives while this task exits must not requeue a finished run
            # (submitit would, and a late warning with nothing to requeue marks the job failed)
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        if rc in (128 + signal.SIGTERM, 128 + signal.SIGINT):
            # the run stopped for a preemption / time limit and saved a checkpoint: task 0 requeues the job
            # (submitit), which ends this task too; wait for that instead of reporting a failure
            if "SUBMITIT_LOCAL_JOB_ID" in os.environ:
                # submitit's local executor restarts a job once every task has exited, with this code
                from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

                sys.exit(LOCAL_REQUEUE_RETURN_CODE)
            deadline = time.time() + 600
            while time.time() < deadline:
                time.sleep(1.0)
            raise RuntimeError("the run stopped on a signal and the job was not requeued within 10 minutes")
        if rc != 0:
            raise RuntimeError(f"mocov3 {' '.join(self.argv[:1])} exited with code {rc}")
        return rc

    def checkpoint(self, *args, **kwargs):
        """Preemption or time limit: let the run save a checkpoint, then requeue the same command."""
        import submitit

        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            if not _wait_pid(self.proc.pid, 600):
                self.proc.kill()
        return submitit.helpers.DelayedSubmission(TrainingTask(self.argv))


def _ignore_usr2() -> None:
    """The run's child setup: SLURM's USR2 ignored (above), and SIGTERM when the wrapper dies however it dies
    (the kernel's parent-death signal): the run checkpoints, ends and releases its folder's lock instead of
    living on as an orphan that holds it."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):  # not Linux: the wrapper's own SIGTERM handling still stops the run
        pass


def _wait_pid(pid: int, timeout: float) -> bool:
    """Wait for a child to end without Popen's lock (this may run inside a signal handler that
    interrupted a Popen call); True when it ended (or was already reaped)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        time.sleep(0.2)
    return False


def submit(argv: Sequence[str], nodes: int = 1, gpus_per_node: int = 1, partition: Optional[str] = None,
           time: str = "72:00:00", account: Optional[str] = None, qos: Optional[str] = None,
           cpus_per_task: int = 10, mem_gb: Optional[int] = None, folder: str = "submitit_logs",
           signal_delay_s: int = 120, executor: str = "slurm", tasks_per_node: Optional[int] = None,
           max_requeues: int = 100):
    """Submit ``argv`` (a mocov3 command line, e.g. ``["pretrain", "--config", ...]``); returns the job.
    ``executor="local"`` runs the tasks on this machine (submitit's local executor; for tests and debugging).
    ``max_requeues``: how many times the job requeues itself at its time limit (submitit's default, 3, would
    end a 300-epoch run on a cluster with a 24-hour limit after four days); preemptions requeue without limit."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("mocov3 submit needs submitit (pip install submitit)") from None
    if not argv or argv[0] not in ("pretrain", "finetune", "linear"):
        raise ConfigError("mocov3 submit -- COMMAND: COMMAND is pretrain, finetune or linear")
    bounds = {"--nodes": (nodes, 1, 100_000), "--gpus-per-node": (gpus_per_node, 0, 64),
              "--tasks-per-node": (tasks_per_node, 1, 1024), "--cpus-per-task": (cpus_per_task, 1, 4096),
              "--mem-gb": (mem_gb, 1, 1 << 20), "--signal-delay": (signal_delay_s, 0, 3600),
              "--max-requeues": (max_requeues, 0, 100_000)}
    for flag, (value, low, high) in bounds.items():
        if value is not None and not low <= value <= high:
            raise ConfigError(f"{flag} {value} is out of range ({low} to {high})")
    tasks = tasks_per_node or max(1, gpus_per_node)
    minutes = parse_time(time)
    if signal_delay_s >= minutes * 60:
        raise ConfigError(f"--signal-delay {signal_delay_s} s is not shorter than the --time limit ({time}): the "
                          f"job would be signalled before it starts")
    try:
        if executor == "local":
            if nodes != 1:
                raise ConfigError("--executor local runs on this machine: --nodes 1")
            import torch

            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if gpus_per_node > have:
                raise ConfigError(f"--gpus-per-node {gpus_per_node}: this machine has {have} GPU(s) (--executor "
                                  f"local runs here; --gpus-per-node 0 for the CPU)")
            ex = submitit.LocalExecutor(folder=folder)
            ex.update_parameters(timeout_min=minutes, tasks_per_node=tasks, gpus_per_node=gpus_per_node,
                                 signal_delay_s=signal_delay_s)
        else:
            ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_requeues)
            params = dict(nodes=nodes, tasks_per_node=tasks, timeout_min=math.ceil(minutes),
                          cpus_per_task=cpus_per_task,
                          name=f"mocov3-{argv[0]}", slurm_partition=partition, slurm_account=account, slurm_qos=qos,
                          slurm_signal_delay_s=signal_delay_s, gpus_per_node=gpus_per_node or None, mem_gb=mem_gb)
            ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return ex.submit(TrainingTask(argv))
    except (NameError, ValueError, OSError, RuntimeError) as e:  # submitit's parameter checks, no sbatch ...
        raise ConfigError(f"cannot submit the job: {first_line(e)}") from None


__all__ = ["submit", "TrainingTask", "parse_time", "master_port"]
