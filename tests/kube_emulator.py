"""An emulated Kubernetes API (kmock) on 127.0.0.1 and the real operator (Kopf) against it, each in its own thread
and event loop, driven from a plain synchronous test over HTTP the way kubectl would.

kmock stores objects verbatim; a real API server fills ``metadata.name`` from ``generateName`` and stamps
``metadata.uid``, ``resourceVersion``, ``generation`` and
``creationTimestamp``. Kopf relies on them (and ``kopf.adopt``-style ownerReferences need the uid), so the emulator
here stamps them on create, bumps the resourceVersion on every patch, and answers a failed JSON-patch test with
422 as the API server does. Resources are registered from the CRDs
themselves (the project's Pipeline CRD and the real KubeRay CRDs), with their status subresources, next to kmock's
bundled built-in resources (Kopf waits for those before it watches anything).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonpatch
import kmock
import requests
import yaml

from tests.k8s_schemas import KUBERAY_CRDS, KUBERAY_FILES

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


class StampingEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus what a real API server adds to objects."""

    _versions = itertools.count(1000)

    async def _handle(self, request):  # noqa: ANN001 (kmock's own types)
        if request.resource is not None and isinstance(request.data, dict):
            if request.action == kmock.action.CREATE:
                meta = request.data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):  # e.g. Kopf's Events
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("generation", 1)
                meta.setdefault("creationTimestamp", dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
                if request.namespace and "namespace" not in meta:
                    meta["namespace"] = request.namespace
                meta["resourceVersion"] = str(next(self._versions))
            elif request.action == kmock.action.UPDATE:
                request.data.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as exc:
            # The API server answers a failed JSON-patch "test" (Kopf tests the resourceVersion before it patches
            # finalizers) with 422, after which Kopf re-reads the object; kmock would answer 500, which Kopf
            # retries with the same stale patch until it gives up.
            message = f"the patch's test failed: {exc}"
            raise kmock.KubernetesError(status=422, reason="Invalid", message=message) from None


def register_crd(emulator: kmock.KubernetesEmulator, crd: dict[str, Any]) -> None:
    names = crd["spec"]["names"]
    for version in crd["spec"]["versions"]:
        if not version.get("served", True):
            continue
        key = f"{crd['spec']['group']}/{version['name']}/{names['plural']}"
        emulator.resources[key] = kmock.ResourceInfo(
            kind=names["kind"], singular=names.get("singular"), namespaced=crd["spec"]["scope"] == "Namespaced",
            verbs=VERBS, shortnames=names.get("shortNames", []), categories=names.get("categories", []),
            subresources=list(version.get("subresources") or {}))


class EmulatedCluster:
    """kmock in a background thread; ``url`` for clients, plus kubectl-like helpers over real HTTP."""

    def __init__(self, crds: list[dict[str, Any]]):
        self.crds = crds
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self.http = requests.Session()

    @classmethod
    def with_kuberay(cls, *extra: dict[str, Any]) -> EmulatedCluster:
        crds = [yaml.load((KUBERAY_CRDS / f).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
                for f in KUBERAY_FILES.values()]
        return cls([*crds, *extra])

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced by __enter__
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        emulator = StampingEmulator()
        emulator.resources.load_bundled()
        for crd in self.crds:
            register_crd(emulator, crd)
        async with emulator, kmock.Server(emulator) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> EmulatedCluster:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or not self.url:
            raise RuntimeError(f"kmock did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self.http.close()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "test-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
        }))
        return path

    # --- kubectl-like helpers ---------------------------------------------------------------------------------------
    @staticmethod
    def path(group: str, version: str, plural: str, namespace: str, name: str | None = None) -> str:
        base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
        return f"{base}/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(self.url + path, json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def get(self, path: str) -> dict[str, Any] | None:
        response = self.http.get(self.url + path, timeout=10)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def list(self, path: str) -> list[dict[str, Any]]:
        return (self.get(path) or {}).get("items", [])

    def delete(self, path: str) -> None:
        response = self.http.delete(self.url + path, timeout=10)
        response.raise_for_status()

    def patch(self, path: str, body: dict[str, Any]) -> None:
        response = self.http.patch(self.url + path, json=body, timeout=10,
                                   headers={"Content-Type": "application/merge-patch+json"})
        response.raise_for_status()

    def patch_status(self, path: str, status: dict[str, Any]) -> None:
        response = self.http.patch(self.url + path + "/status", json={"status": status}, timeout=10,
                                   headers={"Content-Type": "application/merge-patch+json"})
        response.raise_for_status()

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


class OperatorThread:
    """The real operator: ``operators.handlers.register`` on a fresh registry, run by ``kopf.operator`` in its own
    thread and event loop, for all namespaces as in the Deployment (kmock cannot list namespaces: GET
    /api/v1/namespaces fails to parse, so namespace patterns would not work). At shutdown Kopf cancels every task of
    its loop, so it must not share the test's."""

    def __init__(self, interval_s: float = 0.2, image: str = "img:test", **settings: Any):
        """``settings``: more fields of ``operators.config.OperatorSettings`` (policy, start_deadline_s)."""
        self.interval_s, self.image, self.settings = interval_s, image, settings
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kopf", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        import kopf

        from operators.handlers import OperatorSettings, register

        registry = kopf.OperatorRegistry()
        register(registry, OperatorSettings(interval_s=self.interval_s, image=self.image, **self.settings))
        settings = kopf.OperatorSettings()
        settings.watching.server_timeout = 10
        settings.networking.request_timeout = 10
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(kopf.operator(registry=registry, settings=settings, standalone=True,
                                                  clusterwide=True, stop_flag=self._stop,
                                                  ready_flag=self._ready))
        except BaseException as exc:  # reported by stop()
            self.error = exc
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def __enter__(self) -> OperatorThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the operator did not get ready in 30 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the operator did not stop"
        assert self.error is None, f"the operator crashed: {self.error!r}"
