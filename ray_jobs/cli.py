"""The ``scopeforge`` command.

    scopeforge jobs                                     # what can run
    scopeforge run JOB --config FILE [--set k=v ...]    # one job on Ray (RAY_ADDRESS, else a local instance)
    scopeforge run JOB --help                           # every config key of JOB, with its type and default
    scopeforge schema JOB                               # the config's JSON schema
    scopeforge submit JOB --config FILE [--address URL] # to a running Ray cluster (Jobs API); status, logs ID
    scopeforge list | stop ID | delete ID               # the cluster's jobs (Jobs API)
    scopeforge logs --stage URI                         # the logs a stage saved to storage (cluster gone)
    scopeforge render JOB|pipeline --config FILE        # the RayJob / Pipeline manifest for Kubernetes

User errors (a bad file, key, URI or model reference) print one line and exit with status 2; a skip of an already
finished stage exits 0.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from collections.abc import Callable

from shared.config import describe_fields, json_schema, load_config
from shared.configs import JOB_CONFIGS, summary
from shared.errors import UserError

EXIT_USER_ERROR = 2

Command = Callable[[argparse.Namespace], int]


def job_config_class(name: str):
    if name not in JOB_CONFIGS:
        raise UserError(f"unknown job {name!r} (known: {', '.join(sorted(JOB_CONFIGS))})")
    return JOB_CONFIGS[name]


def job_help(name: str) -> str:
    cls = job_config_class(name)
    doc = inspect.cleandoc(cls.__doc__ or "")
    lines = [f"usage: scopeforge run {name} [--config FILE] [--set KEY=VALUE ...] [--force] [--ray-address ADDR]",
             "", doc.strip(), "", "config keys (YAML file, or --set key=value; nested keys with dots):", ""]
    lines += ["  " + line for line in describe_fields(cls)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scopeforge",
        description="Curate data and train compact or robust models on Ray / KubeRay.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'scopeforge jobs' for the jobs and 'scopeforge run JOB --help' for a job's config keys.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("jobs", help="list the jobs, one line each")

    run = sub.add_parser("run", help="run one job on Ray", add_help=False,
                         description="Run one job on Ray: RAY_ADDRESS (or --ray-address) if set, else a local "
                                     "instance.")
    run.add_argument("job", nargs="?", help="job name (see 'scopeforge jobs')")
    add_config_arguments(run)
    run.add_argument("--force", action="store_true", help="rerun even if the stage is done for this config")
    run.add_argument("--ray-address", help="Ray cluster to connect to (default: RAY_ADDRESS, else start one locally)")
    run.add_argument("--dashboard", action="store_true", help="start the Ray dashboard with a local instance")
    run.add_argument("-h", "--help", action="store_true", help="show this help, or the job's config keys")
    run.set_defaults(subparser=run)

    schema = sub.add_parser("schema", help="print a job config's JSON schema")
    schema.add_argument("job")

    pipe = sub.add_parser("pipeline", help="run a pipeline's stages in order (finished stages are skipped)")
    add_config_arguments(pipe)
    pipe.add_argument("--force", action="store_true", help="rerun every stage, even those already done")
    pipe.add_argument("--ray-address", help="Ray cluster to connect to (default: RAY_ADDRESS, else start one locally)")
    pipe.add_argument("--dashboard", action="store_true", help="start the Ray dashboard with a local instance")

    from ray_jobs import demos, submit  # light modules: argparse, yaml, the Jobs API client

    submit.add_parsers(sub)
    demos.add_parser(sub)
    return parser


def commands() -> dict[str, Command]:
    """Subcommand -> handler; each handler imports what it needs (Ray, torch) only when it runs."""
    from ray_jobs import demos, submit

    return {"jobs": _jobs, "run": _run, "schema": _schema, "pipeline": _pipeline, "submit": submit.submit,
            "status": submit.status, "logs": submit.logs, "list": submit.list_jobs, "stop": submit.stop,
            "delete": submit.delete, "render": submit.render, "demo": demos.demo}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML config (keys: see --help of the job)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (repeatable), e.g. --set sae.k=32")


def _jobs(args: argparse.Namespace) -> int:
    width = max(len(n) for n in JOB_CONFIGS)
    for name in sorted(JOB_CONFIGS):
        print(f"{name:<{width}}  {summary(JOB_CONFIGS[name])}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.help or not args.job:
        if args.job:
            print(job_help(args.job))
        else:
            args.subparser.print_help()
            print("\njobs:")
            _jobs(args)
        return 0 if args.help else EXIT_USER_ERROR
    from ray_jobs.runtime import run_job

    cfg = load_config(job_config_class(args.job), args.config, args.overrides)
    run_job(cfg, ray_address=args.ray_address, force=args.force, dashboard=args.dashboard)
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from ray_jobs.pipeline import run_pipeline
    from shared.configs.pipeline import PipelineConfig

    if not args.config:
        raise UserError("pipeline: --config FILE is required (see ray_jobs/configs/*-demo.yaml)")
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    summary = run_pipeline(cfg, source=args.config, ray_address=args.ray_address, force=args.force,
                           dashboard=args.dashboard)
    print(f"pipeline done in {summary['seconds']} s; stages under {summary['output_root']}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(job_config_class(args.job)), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.command:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return commands()[args.command](args)
    except KeyboardInterrupt:
        print("scopeforge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from ray_jobs.errors import stop_worker_output, user_message

        message = user_message(exc)
        if message is None:
            raise
        stop_worker_output()
        print(f"scopeforge: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
