"""HTTP to an address that was judged, not to whatever the name resolves to next: the URL's
host is replaced by that address, while the Host header and the TLS server name (SNI and
the certificate check) stay the hostname's. No connection is reused, so one tenant's
request never rides a connection opened for another hostname."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Mapping

import httpx

from zimage_server.outbound.policy import Destination, IPAddress


class PinnedClient:
    """POSTs that read only the status line and headers (a body never comes back in), and
    GETs whose body is read as far as the caller wants (adapters, input images), with no
    redirects and no proxies from the environment (they would resolve the name again)."""

    def __init__(self, timeout_s: float, verify: ssl.SSLContext | bool = True) -> None:
        self._client = httpx.AsyncClient(
            timeout=timeout_s,
            follow_redirects=False,
            trust_env=False,
            verify=verify,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    async def post(
        self,
        destination: Destination,
        address: IPAddress,
        content: bytes,
        headers: Mapping[str, str],
    ) -> int:
        """The response's status code."""
        request = self._request("POST", destination, address, headers, content)
        response = await self._client.send(request, stream=True)
        await response.aclose()
        return response.status_code

    @contextlib.asynccontextmanager
    async def stream(
        self, destination: Destination, address: IPAddress, headers: Mapping[str, str]
    ) -> AsyncIterator[httpx.Response]:
        """A GET whose body the caller reads (``aiter_raw``) as far as it wants to."""
        request = self._request("GET", destination, address, headers)
        response = await self._client.send(request, stream=True)
        try:
            yield response
        finally:
            await response.aclose()

    def _request(
        self,
        method: str,
        destination: Destination,
        address: IPAddress,
        headers: Mapping[str, str],
        content: bytes | None = None,
    ) -> httpx.Request:
        return self._client.build_request(
            method,
            destination.url.copy_with(host=str(address)),
            content=content,
            headers={**headers, "Host": destination.url.netloc.decode("ascii")},
            extensions={"sni_hostname": destination.host.rstrip(".")},
        )

    async def get(
        self, destination: Destination, address: IPAddress, max_bytes: int
    ) -> tuple[int, bytes | None]:
        """The status and body of a GET; body None when it is over ``max_bytes`` (read no
        further than that, whatever ``Content-Length`` claims)."""
        headers = {"Accept": "image/*", "Accept-Encoding": "identity"}
        async with self.stream(destination, address, headers) as response:
            if response.status_code != 200:
                return response.status_code, b""
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > max_bytes:
                    return 200, None
            return 200, bytes(body)

    async def aclose(self) -> None:
        await self._client.aclose()
