"""Submitting jobs to a running Ray cluster through the Ray Jobs API, and rendering Kubernetes manifests.

    scopeforge submit inspect-model --config my.yaml --address http://127.0.0.1:8265   # prints the submission ID
    scopeforge submit generate -c gen.yaml --working-dir ./seeds --entrypoint-num-gpus 1  # local files, driver on a GPU
    scopeforge status raysubmit_XXXX                                                    # PENDING/RUNNING/SUCCEEDED/...
    scopeforge logs raysubmit_XXXX --follow
    scopeforge list                                                                     # every job the cluster knows
    scopeforge stop raysubmit_XXXX      /   scopeforge delete raysubmit_XXXX            # stop; forget an ended job
    scopeforge logs --stage s3://bucket/runs/try1/remote [--workers]                    # saved logs, cluster gone
    scopeforge render inspect-model --config my.yaml | kubectl apply -f -              # a RayJob
    scopeforge render pipeline --config pipeline.yaml | kubectl apply -f -             # a Pipeline
    scopeforge render crd | kubectl apply -f -                                           # the Pipeline CRD

The job runs as ``scopeforge run JOB --config env:SCOPEFORGE_CONFIG`` with the validated config (credentials
removed) in its runtime environment, exactly as a RayJob runs it on KubeRay. The address: ``--address``, else
RAY_API_SERVER_ADDRESS, else an http(s) RAY_ADDRESS, else http://127.0.0.1:8265 (e.g. ``kubectl port-forward
svc/scopeforge-head-svc 8265``). Ray 2.60 token authentication: the token comes from RAY_AUTH_TOKEN, else the file
named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (Ray's own order), and is sent as a Bearer token: only over
https:// (``--ca-bundle FILE`` for a private CA) or to a loopback address (a port-forward), unless ``--insecure``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import sys
import time
import urllib.parse
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
    """submit, status, logs, list, stop, delete and render."""
    submit = sub.add_parser("submit", help="submit a job to a running Ray cluster (Ray Jobs API)",
                            description="Submit JOB to a Ray cluster's Jobs API; prints the submission ID.")
    submit.add_argument("job", help="job name (see 'scopeforge jobs')")
    add_config_arguments(submit)
    _address_argument(submit)
    submit.add_argument("--submission-id", help="the job's ID (default: chosen by Ray)")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end, then print its logs; exit 1 "
                                                            "unless it SUCCEEDED")
    submit.add_argument("--working-dir", metavar="DIR",
                        help="local folder uploaded with the job (Ray's working_dir): the job runs in it, so the "
                             "config's relative paths (seed images, prompts) name its files")
    submit.add_argument("--entrypoint-num-cpus", type=float, metavar="N", help="CPUs reserved for the driver")
    submit.add_argument("--entrypoint-num-gpus", type=float, metavar="N",
                        help="GPUs reserved for the driver (it then runs on a GPU node)")
    submit.add_argument("--entrypoint-memory", type=int, metavar="BYTES", help="memory reserved for the driver")
    submit.add_argument("--entrypoint-resource", dest="entrypoint_resources", action="append", default=[],
                        metavar="NAME=N", help="a custom resource reserved for the driver (repeatable)")

    status = sub.add_parser("status", help="print a submitted job's status")
    status.add_argument("id", help="submission ID (printed by 'scopeforge submit')")
    _address_argument(status)

    logs = sub.add_parser("logs", help="print a submitted job's logs (Jobs API, or saved in the stage's storage)",
                          description="Print a job's driver log from the Jobs API; with --stage, the logs the stage "
                                      "saved under <stage>/logs/ when it ended (works after the cluster is gone).")
    logs.add_argument("id", nargs="?", help="submission ID (printed by 'scopeforge submit'); with --stage, optional "
                                            "(default: the stage's latest attempt)")
    logs.add_argument("--follow", "-f", action="store_true", help="stream the logs until the job ends")
    logs.add_argument("--stage", metavar="URI", help="read the logs the stage saved at this URI (s3://... or a path)")
    logs.add_argument("--attempt", help="with --stage: this attempt's logs")
    logs.add_argument("--workers", action="store_true", help="with --stage: also every Ray worker's stdout/stderr")
    _address_argument(logs)

    listing = sub.add_parser("list", help="list the cluster's jobs (Jobs API)")
    _address_argument(listing)
    stop = sub.add_parser("stop", help="stop a submitted job")
    stop.add_argument("id", help="submission ID")
    stop.add_argument("--wait", action="store_true", help="wait until the job has ended")
    _address_argument(stop)
    delete = sub.add_parser("delete", help="delete an ended job's record and logs from the cluster")
    delete.add_argument("id", help="submission ID")
    _address_argument(delete)

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
    parser.add_argument("--ca-bundle", metavar="FILE", help="CA certificates (PEM) that sign the https:// "
                                                            "dashboard's certificate")
    parser.add_argument("--insecure", action="store_true",
                        help="send the token over plain http:// to a non-loopback address anyway")


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


def _chain(exc: BaseException | None) -> list[BaseException]:
    """The exception and those it was raised from or while handling (Ray re-raises requests' errors as its own)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _explain(exc: BaseException, address: str, job_id: str | None = None) -> SubmissionError:
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if any(w in lowered for w in (" 401", " 403", "unauthorized", "forbidden", "authentication token")):
        return SubmissionError(f"Ray at {address}: authentication failed (set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
                               "to the cluster's token)")
    if job_id is not None and ("404" in text or "does not exist" in text):
        return SubmissionError(f"job {job_id!r}: no such job on {address}")
    if any("CERTIFICATE_VERIFY_FAILED" in str(e) for e in _chain(exc)):
        return SubmissionError(f"Ray at {address}: the server's TLS certificate is not trusted (give its CA with "
                               "--ca-bundle FILE)")
    if isinstance(exc, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
        return SubmissionError(f"Ray at {address}: cannot reach the Jobs API (is the dashboard running and "
                               "port-forwarded?)")
    return SubmissionError(f"Ray at {address}: {text[:300]}")


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP literal (names are not resolved: what they resolve to can change)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_transport(url: str, sends_token: bool, insecure: bool = False) -> None:
    """Refuse to send a token in clear text over the network: plain http:// only to loopback, or with --insecure."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or not sends_token or insecure or is_loopback(parts.hostname or ""):
        return
    raise SubmissionError(f"--address {url}: refusing to send the Ray token over plain http:// to {parts.hostname}, "
                          "a non-loopback address; use https:// (with --ca-bundle FILE for a private CA), a "
                          "port-forward to 127.0.0.1, or --insecure")


def _verify(url: str, ca_bundle: str | None) -> str | bool:
    if ca_bundle is None:
        return True
    if not url.startswith("https://"):
        raise SubmissionError(f"--ca-bundle {ca_bundle}: only used for https:// addresses, not {url}")
    if not Path(ca_bundle).is_file():
        raise SubmissionError(f"--ca-bundle {ca_bundle}: no such file")
    return str(Path(ca_bundle).resolve())


def client(args: argparse.Namespace):
    """A Jobs API client for the command's --address, --ca-bundle and --insecure, and the URL it talks to."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(args.address)
    headers = auth_headers()
    check_transport(url, bool(headers), args.insecure)
    verify = _verify(url, args.ca_bundle)
    try:
        return JobSubmissionClient(url, headers=headers, verify=verify), url
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
    runtime_env = render.runtime_env(text)
    if args.working_dir is not None:
        if not Path(args.working_dir).is_dir():
            raise UserError(f"--working-dir {args.working_dir}: no such directory")
        runtime_env["working_dir"] = str(Path(args.working_dir).resolve())  # Ray zips and uploads it
    placement = entrypoint_resources(args)
    jobs, url = client(args)
    job_id = _call(jobs.submit_job, url, None, entrypoint=render.entrypoint(args.job), runtime_env=runtime_env,
                   submission_id=args.submission_id, metadata={"scopeforge_job": args.job, "stage": cfg.stage_name},
                   **placement)
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


def entrypoint_resources(args: argparse.Namespace) -> dict[str, Any]:
    """The driver's reservation (Ray's entrypoint_num_cpus / _num_gpus / _memory / _resources), validated."""
    out: dict[str, Any] = {}
    for flag, value in (("num_cpus", args.entrypoint_num_cpus), ("num_gpus", args.entrypoint_num_gpus),
                        ("memory", args.entrypoint_memory)):
        if value is None:
            continue
        if value < 0:
            raise UserError(f"--entrypoint-{flag.replace('_', '-')} {value}: must be >= 0")
        out[f"entrypoint_{flag}"] = value
    resources: dict[str, float] = {}
    for item in args.entrypoint_resources:
        name, sep, amount = item.partition("=")
        try:
            number = float(amount)
        except ValueError:
            number = -1.0
        if not sep or not name or number < 0:
            raise UserError(f"--entrypoint-resource {item}: expected NAME=N with N >= 0, e.g. accelerator_type:A100=1")
        if name in ("CPU", "GPU", "memory"):
            raise UserError(f"--entrypoint-resource {item}: use --entrypoint-num-cpus / -num-gpus / -memory")
        resources[name] = number
    if resources:
        out["entrypoint_resources"] = resources
    return out


def _wait(jobs, url: str, job_id: str, poll_s: float = 1.0) -> str:
    while True:
        status = str(_call(jobs.get_job_status, url, job_id, job_id))
        status = status.rsplit(".", 1)[-1]
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def status(args: argparse.Namespace) -> int:
    jobs, url = client(args)
    info = _call(jobs.get_job_info, url, args.id, args.id)
    status = str(info.status).rsplit(".", 1)[-1]
    message = " ".join(str(info.message or "").split())
    print(f"{args.id} {status}" + (f" - {message}" if message else ""))
    return 0


def logs(args: argparse.Namespace) -> int:
    if args.stage is not None:
        return stored_logs(args)
    if args.attempt is not None or args.workers:
        raise UserError("logs: --attempt and --workers read saved logs: add --stage URI")
    if args.id is None:
        raise UserError("logs: give a submission ID (Jobs API), or --stage URI (the logs a stage saved)")
    jobs, url = client(args)
    if not args.follow:
        print(_call(jobs.get_job_logs, url, args.id, args.id), end="")
        return 0
    _call(jobs.get_job_status, url, args.id, args.id)  # an unknown ID fails here, with one line

    async def follow() -> None:
        async for chunk in jobs.tail_job_logs(args.id):
            print(chunk, end="", flush=True)

    _call(asyncio.run, url, args.id, follow())
    return 0


def stored_logs(args: argparse.Namespace) -> int:
    """The logs a stage saved to ``<stage>/logs/<attempt>/`` when it ended (ray_jobs/stage_logs.py)."""
    from shared import stage_logs
    from shared.storage import Storage

    if args.follow:
        raise UserError("logs --stage: saved logs are complete; --follow is for a running job (Jobs API)")
    logging.getLogger("aiobotocore.credentials").setLevel(logging.WARNING)  # not "found credentials" on stderr
    stage = Storage(args.stage)
    attempt = stage_logs.find_attempt(stage, args.id, args.attempt)
    record = stage_logs.record(stage, attempt)
    print(f"scopeforge: stage {stage.uri()}, attempt {attempt}: {record.get('job')} {record.get('outcome')}"
          + (f" (job {record['submission_id']})" if record.get("submission_id") else ""), file=sys.stderr)
    sections = list(stage_logs.read(stage, attempt, workers=args.workers))
    for title, text in sections:
        if len(sections) > 1:
            print(f"==> {title} <==")
        print(text, end="" if text.endswith("\n") or not text else "\n")
    return 0


def list_jobs(args: argparse.Namespace) -> int:
    """One line per job the cluster knows, oldest first: ID, status, start time (UTC), what it runs."""
    jobs, url = client(args)
    found = sorted(_call(jobs.list_jobs, url, None), key=lambda j: j.start_time or 0)
    for job in found:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job.start_time / 1000)) if job.start_time else "-"
        meta = job.metadata or {}
        what = (f"{meta['scopeforge_job']} (stage {meta.get('stage', '?')})" if "scopeforge_job" in meta
                else " ".join(str(job.entrypoint or "").split())[:80])
        status = str(job.status).rsplit(".", 1)[-1]
        print(f"{job.submission_id or job.job_id}  {status:<9}  {started}  {what}")
    if not found:
        print(f"no jobs on {url}", file=sys.stderr)
    return 0


def stop(args: argparse.Namespace) -> int:
    jobs, url = client(args)
    requested = _call(jobs.stop_job, url, args.id, args.id)
    status = str(_call(jobs.get_job_status, url, args.id, args.id)).rsplit(".", 1)[-1]
    if not requested:
        print(f"{args.id} {status} - already ended, nothing to stop")
        return 0
    if args.wait:
        status = _wait(jobs, url, args.id)
    print(f"{args.id} {status}" + ("" if status in TERMINAL else " - stop requested"))
    return 0


def delete(args: argparse.Namespace) -> int:
    jobs, url = client(args)
    status = str(_call(jobs.get_job_status, url, args.id, args.id)).rsplit(".", 1)[-1]
    if status not in TERMINAL:
        raise SubmissionError(f"job {args.id!r} is {status}: stop it first (scopeforge stop {args.id} --wait)")
    _call(jobs.delete_job, url, args.id, args.id)
    print(f"{args.id} deleted")
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

