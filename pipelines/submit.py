"""Submitting a job in ``jobs/`` to a Ray cluster: the `JobSubmissionClient` wrapper behind `vitdit submit`.

What it does, and why:

- packages the working directory (``runtime_env["working_dir"]``) with the heavy or private paths
  excluded: Ray caps the upload at 512 MiB (docs/facts.md), and a ``.venv`` or ``runs/`` would blow it;
- passes ``MLFLOW_TRACKING_URI`` through so every stage logs to the same store;
- streams the job's logs and returns its exit status;
- keeps credentials out of what ``ray job list`` / the dashboard print. The entrypoint string, the
  job metadata and the runtime env are all shown to anyone who can reach the job server, so
  secrets are refused there. A credential reaches a job only when the user names it with
  ``pass_env`` (it then sits in the runtime env, which the dashboard shows: the user was warned),
  and it is redacted from the logs we stream. On a real cluster, prefer instance roles / workload
  identity so that no credential travels with the job at all.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
import sys
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TextIO

from vitdit.errors import VitditError

log = logging.getLogger(__name__)

# Paths never uploaded with the working directory (gitignore-style patterns, as Ray takes them).
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".venv",
    "venv",
    ".git",
    "runs",
    "data",
    "mlruns",
    "mlflow.db",
    "mlartifacts",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "*.pt",
    "*.safetensors",
    "*.parquet",
    "*.npz",
    ".env",
)
# Environment variables passed through to every job without being asked: not secrets.
PASS_THROUGH_ENV: tuple[str, ...] = ("MLFLOW_TRACKING_URI",)
# Names that hold credentials. Matched case-insensitively against env names and recipe keys.
SECRET_NAME_RE = re.compile(
    r"(secret|passw(or)?d|passwd|token|api[_-]?key|access[_-]?key|private[_-]?key|credential|session[_-]?key)",
    re.IGNORECASE,
)
# Values that are credentials whatever their name: AWS access key ids, PEM keys, URIs with a password.
SECRET_VALUE_RES = (
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"^[a-z][a-z0-9+.-]*://[^/@:\s]+:[^/@\s]+@", re.IGNORECASE),
)
REDACTED = "***"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_MIN_SECRET_LEN = 6
SUBMIT_RETRY_S = 120.0
CONNECT_RETRY_S = 60.0  # how long to retry reaching a job server that answers slowly  # how long to retry a submission that a starting head refuses  # shorter values would redact ordinary words from the logs


def is_secret_name(name: str) -> bool:
    """True for names like AWS_SECRET_ACCESS_KEY, HF_TOKEN, db_password."""
    return bool(SECRET_NAME_RE.search(name))


def looks_like_secret_value(value: str) -> bool:
    """True for values that are credentials whatever they are called (AWS key ids, PEM keys, user:pass@ URIs)."""
    return any(r.search(value) for r in SECRET_VALUE_RES)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment's credential-named variables (what must never be printed)."""
    environ = os.environ if environ is None else environ
    vals = {v for k, v in environ.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)  # longest first so a value inside another is covered


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value and every URI password replaced by ***."""
    for s in secrets:
        if s:
            text = text.replace(s, REDACTED)
    # user:password@host in any URI the job printed
    return re.sub(r"([a-z][a-z0-9+.-]*://[^/@:\s]+:)[^/@\s]+@", rf"\1{REDACTED}@", text, flags=re.IGNORECASE)


def check_no_secrets(
    args: Iterable[str], environ: Mapping[str, str] | None = None, where: str = "job arguments"
) -> None:
    """Refuse arguments that carry a credential: they would be printed by ``ray job list``."""
    environ = os.environ if environ is None else environ
    values = secret_values(environ)
    for a in args:
        flag = a.split("=", 1)[0]
        if flag.startswith("--") and is_secret_name(flag):
            raise VitditError(
                f"{where}: {flag!r} looks like a credential; credentials come from the environment "
                "(or the cluster's instance role), never from the command line"
            )
        if any(v in a for v in values) or looks_like_secret_value(a):
            raise VitditError(
                f"{where}: an argument contains a credential (the value of a secret environment variable "
                "or a user:password URI); the job's entrypoint is printed by `ray job list`, so it is refused"
            )


def check_tracking_uri(uri: str) -> None:
    """A tracking URI with a password would be printed with the runtime env: ask for MLflow's env vars."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.password:
        raise VitditError(
            "MLFLOW_TRACKING_URI contains a password; set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD instead (pass them with --pass-env if the job needs them)"
        )


def module_entrypoint(module: str, args: Iterable[str], python: str = "python") -> str:
    """The shell command Ray runs: ``<python> -m jobs.<module> <args>``, every word quoted."""
    return shlex.join([python, "-m", f"jobs.{module}", *args])


def check_module(module: str, working_dir: str) -> None:
    """``module`` must name a job file in ``<working_dir>/jobs/`` (not a private helper)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", module) or module in ("cli", "submit"):
        raise VitditError(f"module {module!r}: not a job name (use a file name in jobs/, e.g. train_dit)")
    path = os.path.join(working_dir, "jobs", module + ".py")
    if not os.path.isfile(path):
        jobs_dir = os.path.join(working_dir, "jobs")
        have = sorted(
            f[:-3]
            for f in (os.listdir(jobs_dir) if os.path.isdir(jobs_dir) else [])
            if f.endswith(".py") and not f.startswith("_")
        )
        raise VitditError(f"module {module!r}: no {path} (jobs here: {', '.join(have) or 'none'})")


def build_runtime_env(
    working_dir: str,
    pass_env: Iterable[str] = (),
    excludes: Iterable[str] = DEFAULT_EXCLUDES,
    environ: Mapping[str, str] | None = None,
) -> dict:
    """The runtime env of a job: the working directory minus excludes, plus the passed-through env vars.

    ``MLFLOW_TRACKING_URI`` always travels when set. Other variables travel only when named in
    ``pass_env``; a credential-named one is logged as a warning because the dashboard shows the
    runtime env of every job.
    """
    environ = os.environ if environ is None else environ
    env_vars: dict[str, str] = {}
    for name in PASS_THROUGH_ENV:
        if environ.get(name):
            if name == "MLFLOW_TRACKING_URI":
                check_tracking_uri(environ[name])
            env_vars[name] = environ[name]
    for name in pass_env:
        if name not in environ:
            raise VitditError(f"--pass-env {name}: not set in this environment")
        if is_secret_name(name):
            log.warning(
                "passing %s to the job as asked: Ray shows a job's runtime env to anyone who can reach "
                "its dashboard; prefer the cluster's instance role or a secret store",
                name,
            )
        env_vars[name] = environ[name]
    runtime_env: dict = {"working_dir": os.path.abspath(working_dir), "excludes": list(excludes)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


def default_python(address: str) -> str:
    """The interpreter for the entrypoint: this one for a head on this machine, else the image's ``python``.

    The entrypoint runs through a shell, where a bare ``python`` may be another interpreter
    (docs/facts.md); a head on loopback shares this machine's files, so this interpreter is right there.
    """
    host = urllib.parse.urlsplit(address if "://" in address else "http://" + address).hostname or ""
    return sys.executable if host in ("127.0.0.1", "localhost", "::1") else "python"


def submission_id_for(module: str, args: Iterable[str], attempt: int = 0, prefix: str = "vitdit") -> str:
    """A deterministic submission id: the same command gets the same id (Ray rejects duplicates)."""
    digest = hashlib.sha256("\0".join([module, *args]).encode()).hexdigest()[:12]
    return f"{prefix}-{module.replace('_', '-')}-{digest}" + (f"-r{attempt}" if attempt else "")


@dataclass
class JobOutcome:
    """How a submitted job ended."""

    submission_id: str
    status: str  # SUCCEEDED, FAILED, STOPPED (or PENDING/RUNNING with wait=False)
    exit_code: int  # 0 on success; the driver's exit code, else 1


def enable_token_auth_if_available() -> None:
    """Send this machine's Ray token (``~/.ray/auth_token`` or $RAY_AUTH_TOKEN) when there is one.

    ``ray start`` turns token auth on when a token exists, but the job client only sends it when
    token auth is on in its own process: do what ``ray.init`` does when joining a cluster.
    Private Ray API (pinned Ray range); without it, set RAY_AUTH_MODE=token yourself.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    enable_token_auth_if_available()
    deadline = time.monotonic() + CONNECT_RETRY_S
    while True:
        try:
            return JobSubmissionClient(address)
        except Exception as e:  # ConnectionError, or a version mismatch
            err = e
        chain, cause = [], err
        while cause is not None:
            chain.append(repr(cause))
            cause = cause.__cause__ or cause.__context__
        # Nothing listening: fail now. A busy head (timeouts) gets a few more tries.
        if "Connection refused" in " ".join(chain) or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    raise VitditError(
        f"--address {address}: cannot reach the Ray job server ({err}). A cluster's dashboard listens "
        "on 127.0.0.1 only: open it with `ray dashboard cluster.yaml` or an SSH tunnel first"
    ) from err


def _exit_code(info, status: str) -> int:
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    if status == "STOPPED":
        return 130
    return int(code) if code else 1


def wait_for_job(
    client,
    submission_id: str,
    out: TextIO | None | str = "stdout",
    secrets: Iterable[str] = (),
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> JobOutcome:
    """Stream a job's logs (redacted) to ``out`` (default: the current sys.stdout; None: quiet) until it ends."""
    out = sys.stdout if out == "stdout" else out
    secrets = list(secrets)
    printed = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(submission_id).value)
        logs = client.get_job_logs(submission_id)
        if out is not None and len(logs) > printed:
            out.write(redact(logs[printed:], secrets))
            out.flush()
            printed = len(logs)
        if status in TERMINAL:
            info = client.get_job_info(submission_id)
            return JobOutcome(submission_id, status, _exit_code(info, status))
        if deadline is not None and time.monotonic() > deadline:
            client.stop_job(submission_id)
            raise VitditError(f"job {submission_id}: still {status} after {timeout_s:.0f} s; stopped it")
        time.sleep(poll_s)


def submit(
    address: str,
    module: str,
    args: list[str],
    *,
    working_dir: str = ".",
    python: str | None = None,
    pass_env: Iterable[str] = (),
    submission_id: str | None = None,
    wait: bool = True,
    out: TextIO | None | str = "stdout",
    entrypoint_num_cpus: float | None = None,
    timeout_s: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> JobOutcome:
    """Submit ``python -m jobs.<module> <args>`` to the cluster at ``address``; stream logs; return the outcome.

    With no ``submission_id`` one is derived from the command, so re-running the same command
    while its job is still pending or running attaches to that job instead of starting a second
    one; after a failed or stopped attempt a new attempt id is used.
    """
    environ = os.environ if environ is None else environ
    pass_env = list(pass_env)
    check_module(module, working_dir)
    check_no_secrets(args, environ)
    runtime_env = build_runtime_env(working_dir, pass_env, environ=environ)
    entrypoint = module_entrypoint(module, args, python or default_python(address))
    # Only non-secret facts: metadata is printed by `ray job list`.
    metadata = {"vitdit_module": module}
    client = _client(address)
    # Redact every credential we know of, including those the job was given on purpose.
    secrets = secret_values(environ) + [environ[n] for n in pass_env if is_secret_name(n) and environ.get(n)]

    sid = submission_id
    if sid is None:
        attempt = 0
        while True:
            sid = submission_id_for(module, args, attempt)
            status = _status_or_none(client, sid)
            if status is None:
                break
            if status not in TERMINAL or status == "SUCCEEDED":
                log.info("job %s already %s: attaching to it", sid, status)
                return (
                    wait_for_job(client, sid, out, secrets, timeout_s=timeout_s)
                    if wait
                    else JobOutcome(sid, status, 0)
                )
            attempt += 1
    log.info("submitting %s to %s", redact(entrypoint, secrets), address)
    deadline = time.monotonic() + SUBMIT_RETRY_S
    while True:
        try:
            client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=sid,
                metadata=metadata,
                entrypoint_num_cpus=entrypoint_num_cpus,
            )
            break
        except RuntimeError as e:
            if "already exists" in str(e):  # an earlier try of ours got through: same id, same job
                break
            # A freshly started head answers 500 "No available agent" until its agent is up.
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise VitditError(f"job {sid}: submission refused by {address} ({e})") from e
    if not wait:
        return JobOutcome(sid, "PENDING", 0)
    return wait_for_job(client, sid, out, secrets, timeout_s=timeout_s)


def _status_or_none(client, submission_id: str) -> str | None:
    try:
        return str(client.get_job_status(submission_id).value)
    except RuntimeError:  # "Job ... does not exist"
        return None
