"""Submitting jobs to a running Ray cluster through the Ray Jobs API, and rendering Kubernetes manifests.

    scopeforge submit inspect-model --config my.yaml --address http://127.0.0.1:8265   # prints the submission ID
    scopeforge status raysubmit_XXXX                                                    # PENDING/RUNNING/SUCCEEDED/...
    scopeforge logs raysubmit_XXXX --follow
    scopeforge render inspect-model --config my.yaml | kubectl apply -f -              # a RayJob
    scopeforge render pipeline --config pipeline.yaml | kubectl apply -f -             # a Pipeline
    scopeforge render crd | kubectl apply -f -                                           # the Pipeline CRD

The job runs as ``scopeforge run JOB --config env:SCOPEFORGE_CONFIG`` with the validated config (credentials
removed) in its runtime environment, exactly as a RayJob runs it on KubeRay. The address: ``--address``, else
RAY_API_SERVER_ADDRESS, else an http(s) RAY_ADDRESS, else http://127.0.0.1:8265 (e.g. ``kubectl port-forward
svc/scopeforge-head-svc 8265``). Ray 2.60 token authentication: the token comes from RAY_AUTH_TOKEN, else the file
named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (Ray's own order), and is sent as a Bearer token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ray_jobs.cli import add_config_arguments, job_config_class
from shared.config import dump_config, load_config
from shared.errors import UserError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmissionError(UserError):
    """The Ray Jobs API cannot be reached, refuses us, or does not know the job."""


# ---------------------------------------------------------------------------------------------------------------------
# Parsers


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """submit, status, logs and render."""
    submit = sub.add_parser("submit", help="submit a job to a running Ray cluster (Ray Jobs API)",
                            description="Submit JOB to a Ray cluster's Jobs API; prints the submission ID.")
    submit.add_argument("job", help="job name (see 'scopeforge jobs')")
    add_config_arguments(submit)
    _address_argument(submit)
    submit.add_argument("--submission-id", help="the job's ID (default: chosen by Ray)")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end, then print its logs; exit 1 "
                                                            "unless it SUCCEEDED")

    status = sub.add_parser("status", help="print a submitted job's status")
    status.add_argument("id", help="submission ID (printed by 'scopeforge submit')")
    _address_argument(status)

    logs = sub.add_parser("logs", help="print a submitted job's logs")
    logs.add_argument("id", help="submission ID (printed by 'scopeforge submit')")
    logs.add_argument("--follow", "-f", action="store_true", help="stream the logs until the job ends")
    _address_argument(logs)

    render = sub.add_parser("render", help="print the RayJob of a job, the Pipeline of a pipeline config, or the CRD",
                            description="Print a Kubernetes manifest: 'render JOB' a RayJob running the job with the "
                                        "config; 'render pipeline' a Pipeline custom resource; 'render crd' the "
                                        "Pipeline CRD of this installed version (as in manifests/crds/).")
    render.add_argument("what", metavar="JOB|pipeline|crd", help="a job name, 'pipeline' or 'crd'")
    add_config_arguments(render)
    render.add_argument("--name", help="metadata.name (default: from the config file's name)")
    render.add_argument("--namespace", "-n", help="metadata.namespace (default: none, kubectl's current one)")
    render.add_argument("--image", help="image of the Ray pods (default: SCOPEFORGE_IMAGE, else the kustomize name "
                                        "'scopeforge')")
    render.add_argument("--cluster", metavar="RAYCLUSTER", help="run on this existing RayCluster instead of one made "
                                                                "for the job")
    render.add_argument("--storage-secret", default="scopeforge-storage",
                        help="Secret with the object-storage credentials (default: scopeforge-storage)")


def _address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help=f"Ray dashboard URL (default: RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, "
                                          f"else {DEFAULT_ADDRESS})")



# ---------------------------------------------------------------------------------------------------------------------
# The Jobs API client


def resolve_address(address: str | None) -> str:
    candidates = [address, os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")]
    chosen = next((a for a in candidates[:2] if a), None)
    if chosen is None and candidates[2] and candidates[2].startswith(("http://", "https://")):
        chosen = candidates[2]
    chosen = (chosen or DEFAULT_ADDRESS).rstrip("/")
    if not chosen.startswith(("http://", "https://")):
        raise SubmissionError(f"--address {chosen}: the Jobs API needs the dashboard's http(s):// URL, "
                              f"e.g. {DEFAULT_ADDRESS}")
    return chosen


def auth_headers() -> dict[str, str]:
    """Ray's token, where Ray itself looks for it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        try:
            token = Path(path).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SubmissionError(f"RAY_AUTH_TOKEN_PATH {path}: cannot read the token ({exc.strerror})") from None
        if not token:
            raise SubmissionError(f"RAY_AUTH_TOKEN_PATH {path}: the file is empty")
    if not token:
        default = Path.home() / ".ray" / "auth_token"
        if default.is_file():
            token = default.read_text(encoding="utf-8").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _explain(exc: BaseException, address: str, job_id: str | None = None) -> SubmissionError:
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if any(w in lowered for w in (" 401", " 403", "unauthorized", "forbidden", "authentication token")):
        return SubmissionError(f"Ray at {address}: authentication failed (set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
                               "to the cluster's token)")
    if job_id is not None and ("404" in text or "does not exist" in text):
        return SubmissionError(f"job {job_id!r}: no such job on {address}")
    if isinstance(exc, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
        return SubmissionError(f"Ray at {address}: cannot reach the Jobs API (is the dashboard running and "
                               "port-forwarded?)")
    return SubmissionError(f"Ray at {address}: {text[:300]}")


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url, headers=auth_headers()), url
    except SubmissionError:
        raise
    except Exception as exc:  # ConnectionError, requests' HTTPError, RuntimeError from the version check
        raise _explain(exc, url) from None


def _call(fn, url: str, job_id: str | None, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise _explain(exc, url, job_id) from None


# ---------------------------------------------------------------------------------------------------------------------
# Commands


def submit(args: argparse.Namespace) -> int:
    from shared.manifests import render

    cfg = load_config(job_config_class(args.job), args.config, args.overrides)
    text = render.config_yaml(yaml.safe_load(dump_config(cfg)))
    jobs, url = client(args.address)
    job_id = _call(jobs.submit_job, url, None, entrypoint=render.entrypoint(args.job),
                   runtime_env=render.runtime_env(text), submission_id=args.submission_id,
                   metadata={"scopeforge_job": args.job, "stage": cfg.stage_name})
    print(job_id, flush=True)
    print(f"submitted {args.job} to {url}; follow it with: scopeforge logs {job_id} --follow --address {url}",
          file=sys.stderr)
    if not args.wait:
        return 0
    status = _wait(jobs, url, job_id)
    print(_call(jobs.get_job_logs, url, job_id, job_id), end="")
    if status != "SUCCEEDED":
        info = _call(jobs.get_job_info, url, job_id, job_id)
        print(f"scopeforge: job {job_id} {status}: {' '.join(str(info.message or '').split())[:300]}",
              file=sys.stderr)
        return 1
    return 0


def _wait(jobs, url: str, job_id: str, poll_s: float = 1.0) -> str:
    while True:
        status = str(_call(jobs.get_job_status, url, job_id, job_id))
        status = status.rsplit(".", 1)[-1]
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def status(args: argparse.Namespace) -> int:
    jobs, url = client(args.address)
    info = _call(jobs.get_job_info, url, args.id, args.id)
    status = str(info.status).rsplit(".", 1)[-1]
    message = " ".join(str(info.message or "").split())
    print(f"{args.id} {status}" + (f" - {message}" if message else ""))
    return 0


def logs(args: argparse.Namespace) -> int:
    jobs, url = client(args.address)
    if not args.follow:
        print(_call(jobs.get_job_logs, url, args.id, args.id), end="")
        return 0
    _call(jobs.get_job_status, url, args.id, args.id)  # an unknown ID fails here, with one line

    async def follow() -> None:
        async for chunk in jobs.tail_job_logs(args.id):
            print(chunk, end="", flush=True)

    _call(asyncio.run, url, args.id, follow())
    return 0


def render(args: argparse.Namespace) -> int:
    from shared.configs.pipeline import PipelineConfig
    from shared.manifests import render
    from shared.manifests.spec import StageResources, pipeline_resource
    from shared.pipeline import stage_configs

    if args.what == "crd":
        from shared.manifests.crd import render_crd

        sys.stdout.write(render_crd())
        return 0
    if args.config is None and args.what == "pipeline":
        raise UserError("render pipeline: --config FILE is required")
    default_name = Path(args.config).stem if args.config and not args.config.startswith("env:") else args.what
    image = args.image or os.environ.get("SCOPEFORGE_IMAGE") or render.DEFAULT_IMAGE
    if args.what == "pipeline":
        pipeline = load_config(PipelineConfig, args.config, args.overrides)
        stage_configs(pipeline, args.config)  # every stage validates before anything is printed
        _needs_shared_root(pipeline.output_root, "output_root")
        body = pipeline_resource(pipeline, render.dns1035(args.name or default_name), args.namespace,
                                 storage_secret=args.storage_secret, image=args.image)
        if args.cluster:
            body["spec"]["cluster"] = {"clusterSelector": {"ray.io/cluster": args.cluster}}
    else:
        cfg = load_config(job_config_class(args.what), args.config, args.overrides)
        _needs_shared_root(cfg.output_root, "output_root")
        name = render.dns1035(args.name or default_name)[: render.MAX_RAYJOB_NAME].rstrip("-")
        body = render.rayjob(name, args.what, render.config_yaml(yaml.safe_load(dump_config(cfg))),
                             namespace=args.namespace, image=image, storage_secret=args.storage_secret,
                             cluster_selector={"ray.io/cluster": args.cluster} if args.cluster else None,
                             resources=StageResources())
        problems = render.kuberay_rule_problems(body)
        if problems:
            raise UserError(problems[0])
    sys.stdout.write(render.to_yaml(body))
    return 0


def _needs_shared_root(root: str, key: str) -> None:
    if not root.startswith(("s3://", "s3a://", "file:///")):
        raise UserError(f"{key} {root}: pods on Kubernetes cannot reach a local path; use s3://bucket/prefix "
                        f"(e.g. --set {key}=s3://scopeforge/runs/try1)")

