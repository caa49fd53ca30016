"""``vitdit submit``: run a job in ``jobs/`` on a Ray cluster, stream its logs, exit with its status.

    # on a laptop with the cluster's dashboard forwarded (`ray dashboard cluster.yaml`)
    vitdit submit train_dit --address http://127.0.0.1:8265 -- \\
        --latents s3://bucket/latents/imagenet256 --model DiT-XL/2 --output s3://bucket/runs/dit-xl

Everything after ``--`` goes to the job. ``MLFLOW_TRACKING_URI`` is passed through; other
environment variables travel only when named with ``--pass-env`` (the dashboard shows them), and
credentials are refused in the job arguments (``ray job list`` prints the entrypoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jobs._common import add_dataclass_arguments, dataclass_from_args, run_main


@dataclasses.dataclass
class SubmitConfig:
    address: str = dataclasses.field(
        default="http://127.0.0.1:8265", metadata={"help": "the Ray job server (dashboard) address"}
    )
    working_dir: str = dataclasses.field(
        default=".", metadata={"help": "directory uploaded with the job (the repo)"}
    )
    python: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "interpreter on the cluster (default: this one for a loopback head, else `python`)"
        },
    )
    pass_env: tuple[str, ...] = dataclasses.field(
        default=(),
        metadata={"help": "comma-separated env var names to pass to the job (shown by the dashboard)"},
    )
    submission_id: str | None = dataclasses.field(
        default=None, metadata={"help": "job id (default: derived from the command, so a retry re-attaches)"}
    )
    wait: bool = dataclasses.field(default=True, metadata={"help": "stream logs and wait for the job to end"})


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Split at the first "--": argparse would otherwise read the job's flags as ours.
    job_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, job_args = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(
        prog=prog or "vitdit submit",
        description=__doc__.split("\n")[0],
        usage=f"{prog or 'vitdit submit'} MODULE [--address URL] [--working-dir DIR] [...] -- [job args]",
    )
    parser.add_argument("module", help="a job file in jobs/, e.g. train_dit")
    add_dataclass_arguments(parser, SubmitConfig)
    args = parser.parse_args(argv)
    cfg = dataclass_from_args(SubmitConfig, args)

    def body() -> int:
        from pipelines.submit import submit

        outcome = submit(
            cfg.address,
            args.module,
            job_args,
            working_dir=cfg.working_dir,
            python=cfg.python,
            pass_env=cfg.pass_env,
            submission_id=cfg.submission_id,
            wait=cfg.wait,
        )
        print(f"job {outcome.submission_id}: {outcome.status}", file=sys.stderr)
        return outcome.exit_code

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
