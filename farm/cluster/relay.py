"""Run a farm entry point as a Ray job (Jobs API) and bring its output folder back.

`farm nightly --address http://HEAD:8265 ...` submits `python -m jobs.nightly` to the cluster
and the job packs its --out folder into its own log (base64 tar.gz between markers), which
this side unpacks: CI gets the report and tables as local files, with the job's exit code.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shlex
import sys
import tarfile
import time
import uuid

BEGIN, END, EXIT = "KERNEL-FARM-ARTIFACTS-BEGIN", "KERNEL-FARM-ARTIFACTS-END", "KERNEL-FARM-EXIT"


def pack(folder: str, rc: int) -> None:
    """Print `folder` as base64 tar.gz between markers, then the exit code (runs in the job)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        if os.path.isdir(folder):
            tar.add(folder, arcname=".")
    print(BEGIN)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    for i in range(0, len(encoded), 76):
        print(encoded[i:i + 76])
    print(END)
    print(f"{EXIT} {rc}", flush=True)


def unpack(logs: str, out: str) -> int | None:
    """Extract the packed folder from job logs into `out`; returns the job's exit code."""
    match = re.search(rf"{BEGIN}\n(.*?)\n{END}\n{EXIT} (-?\d+)", logs, re.S)
    if not match:
        return None
    data = base64.b64decode("".join(match.group(1).split()))
    os.makedirs(out, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(out, filter="data")
    return int(match.group(2))


def job_client(dashboard: str, token_file: str | None = None):
    """A Jobs API client of the cluster at `dashboard`. With `token_file` (a local cluster's
    auth_token, a copy of a head's) its token goes in every request, whatever this process's
    RAY_AUTH_MODE; without, Ray sends the token of its environment in token mode."""
    from ray.job_submission import JobSubmissionClient

    if token_file is None:
        return JobSubmissionClient(dashboard)
    from farm.cluster.node import read_token

    return JobSubmissionClient(dashboard, headers={"Authorization": f"Bearer {read_token(token_file)}"})


def submit_and_fetch(dashboard: str, module: str, args: list[str], out: str, working_dir: str,
                     timeout_s: float = 6 * 3600, token_file: str | None = None) -> int:
    from ray.job_submission import JobStatus

    remote_out = f"/tmp/kernel-farm-job-{uuid.uuid4().hex[:8]}"
    command = " ".join(shlex.quote(a) for a in ["python", "-m", module, *args, "--out", remote_out])
    entrypoint = f"{command}; rc=$?; python -m farm.cluster.relay {shlex.quote(remote_out)} $rc; exit $rc"
    client = job_client(dashboard, token_file)
    job = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": working_dir})
    deadline = time.time() + timeout_s
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            client.stop_job(job)
            raise TimeoutError(f"job {job} did not finish in {timeout_s:.0f} s")
        time.sleep(2)
    logs = client.get_job_logs(job)
    rc = unpack(logs, out)
    if rc is None:
        sys.stderr.write(logs[-4000:])
        raise RuntimeError(f"job {job} ended {client.get_job_status(job)} without its artefacts (log tail above)")
    return rc


if __name__ == "__main__":
    pack(sys.argv[1], int(sys.argv[2]))
