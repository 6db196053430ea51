"""A small asynchronous Kubernetes API client on aiohttp (Kopf's own dependency), for what Kopf does not do itself:
creating, listing and deleting RayJobs, listing the pods of their clusters (it reads no Secret).

Credentials are the ones Kopf logs in with (``kopf.login_with_service_account`` in a pod, else the kubeconfig),
captured by the operator's login handler, so the operator and this client always talk to the same API server.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf


class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, message: str):
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.message = message


class Kube:
    def __init__(self) -> None:
        self.info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._login_kwargs: dict[str, Any] = {}
        self._stale = False

    def login(self, **kwargs: Any) -> kopf.ConnectionInfo:
        """Kopf's login: the pod's service account, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
        info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        if info is None:
            raise kopf.LoginError("no credentials: not in a pod with a service account, and no kubeconfig")
        self.info = info
        self._login_kwargs = kwargs
        self._stale = True  # the next request opens a session with these credentials
        return info

    async def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._stale and self._session is not None and not self._session.closed:
            await self._session.close()
        if self._session is None or self._session.closed or self._loop is not loop or self._stale:
            self._stale = False
            if self.info is None:
                raise kopf.TemporaryError("the operator has not logged in yet", delay=1)
            ssl: Any = self.info.as_ssl_context() if self.info.server.startswith("https") else None
            self._session = aiohttp.ClientSession(
                base_url=self.info.server.rstrip("/") + "/",
                headers={**self.info.as_http_headers(), "Accept": "application/json"},
                connector=aiohttp.TCPConnector(ssl=ssl) if ssl is not None else None,
                timeout=aiohttp.ClientTimeout(total=30),
            )
            self._loop = loop
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def request(self, method: str, path: str, *, body: Any = None, params: dict[str, str] | None = None,
                      content_type: str = "application/json") -> tuple[int, Any]:
        for attempt in range(2):
            session = await self._client()
            headers = {"Content-Type": content_type} if body is not None else {}
            async with session.request(method, path.lstrip("/"), json=body, params=params,
                                       headers=headers) as response:
                try:
                    data = await response.json(content_type=None)
                except (aiohttp.ContentTypeError, ValueError):
                    data = {"message": (await response.text())[:500]}
            if response.status == 401 and attempt == 0 and self._login_kwargs:
                self.login(**self._login_kwargs)  # a rotated service-account token: read it again, retry once
                continue
            return response.status, data
        return response.status, data

    async def get(self, path: str) -> dict[str, Any] | None:
        status, data = await self.request("GET", path)
        if status == 404:
            return None
        _check(status, "GET", path, data)
        return data

    async def list(self, path: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        """Objects under ``path`` carrying all ``labels`` (filtered here too, whatever the server did)."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        status, data = await self.request("GET", path, params={"labelSelector": selector})
        _check(status, "GET", path, data)
        items = data.get("items") or []
        return [item for item in items
                if all(((item.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in labels.items())]

    async def delete(self, path: str, propagation: str = "Background") -> bool:
        """DELETE with a propagation policy; False when the object is already gone (404)."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        status, data = await self.request("DELETE", path, body=body)
        if status == 404:
            return False
        _check(status, "DELETE", path, data)
        return True

    async def create(self, path: str, body: dict[str, Any]) -> bool:
        """POST; False when an object of that name already exists (409), which callers treat as done."""
        status, data = await self.request("POST", path, body=body)
        if status == 409:
            return False
        _check(status, "POST", path, data)
        return True


def _check(status: int, method: str, path: str, data: Any) -> None:
    if status >= 400:
        message = data.get("message") if isinstance(data, dict) else str(data)
        raise ApiError(status, method, path, " ".join(str(message or "").split())[:300])


def namespaced(group: str, version: str, plural: str, namespace: str, name: str | None = None) -> str:
    base = f"/api/{version}" if group == "" else f"/apis/{group}/{version}"
    path = f"{base}/namespaces/{quote(namespace)}/{plural}"
    return f"{path}/{quote(name)}" if name else path
