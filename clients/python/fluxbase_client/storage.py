"""Storage: buckets, streamed uploads with progress, presigned URLs, listing, deletes."""

from __future__ import annotations

import io
import mimetypes
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx

from fluxbase_client.errors import FluxbaseError

if TYPE_CHECKING:
    from fluxbase_client._client import AsyncFluxbase

Progress = Callable[[int, int | None], Any]
CHUNK = 256 * 1024


class Storage:
    def __init__(self, client: AsyncFluxbase):
        self.client = client

    @property
    def _pid(self) -> str:
        return self.client.project_id

    async def list_buckets(self) -> list[dict[str, Any]]:
        out = await self.client.request("GET", "/api/storage/buckets", params={"projectId": self._pid})
        return list(out["buckets"])

    async def create_bucket(self, name: str, *, public: bool = False, **extra: Any) -> dict[str, Any]:
        body = {"projectId": self._pid, "name": name, "isPublic": public, **extra}
        out = await self.client.request("POST", "/api/storage/buckets", json_body=body, idempotent=False)
        return dict(out["bucket"])

    async def delete_bucket(self, bucket: str) -> dict[str, Any]:
        body = {"projectId": self._pid, "bucketId": bucket}
        out = await self.client.request("DELETE", "/api/storage/buckets", json_body=body, idempotent=True)
        return dict(out["bucket"])

    async def upload(
        self,
        bucket: str,
        source: str | Path | bytes | IO[bytes],
        name: str | None = None,
        *,
        content_type: str | None = None,
        upsert: bool = False,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Upload a file, streamed from disk (never read whole into memory): multipart to
        /api/storage/upload with bucketId and projectId first, so the server streams it straight
        to its final key. `progress(sent, total)` is called as bytes go out."""
        if isinstance(source, str | Path):
            path = Path(source)
            name = name or path.name
            total: int | None = path.stat().st_size
            opener: Callable[[], IO[bytes]] = lambda: path.open("rb")  # noqa: E731
        elif isinstance(source, bytes):
            total = len(source)
            if not name:
                raise ValueError("name is required when uploading bytes")
            data = source
            opener = lambda: io.BytesIO(data)  # noqa: E731
        else:
            stream = source
            if not name:
                raise ValueError("name is required when uploading a stream")
            total = None
            opener = lambda: stream  # noqa: E731
        ctype = content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
        boundary = "fluxbase-" + secrets.token_hex(12)
        head = (
            _field(boundary, "projectId", self._pid)
            + _field(boundary, "bucketId", bucket)
            + (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{_q(name)}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n"
            ).encode()
        )
        tail = f"\r\n--{boundary}--\r\n".encode()

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            yield head
            f = opener()
            try:
                while True:
                    chunk = f.read(CHUNK)
                    if not chunk:
                        break
                    sent += len(chunk)
                    yield chunk
                    if progress is not None:
                        progress(sent, total)
            finally:
                if f is not source:
                    f.close()
            yield tail

        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        if total is not None:
            headers["Content-Length"] = str(len(head) + total + len(tail))
        if upsert:
            headers["x-upsert"] = "true"
        out = await self.client.request(
            "POST", "/api/storage/upload", content=body(), headers=headers, idempotent=False
        )
        return dict(out["file"])

    async def create_upload_url(
        self, bucket: str, name: str, *, content_type: str | None = None, size: int | None = None
    ) -> dict[str, Any]:
        """A presigned POST straight to S3 (for browsers and large files): url, fields, file."""
        body = {"projectId": self._pid, "bucketId": bucket, "name": name}
        if content_type:
            body["contentType"] = content_type
        if size is not None:
            body["size"] = size  # type: ignore[assignment]
        return dict(
            await self.client.request("POST", "/api/storage/upload-url", json_body=body, idempotent=False)
        )

    async def upload_direct(
        self, bucket: str, path: str | Path, name: str | None = None, *, content_type: str | None = None
    ) -> dict[str, Any]:
        """Upload straight to S3 through a presigned POST, then confirm it."""
        path = Path(path)
        name = name or path.name
        ctype = content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
        post = await self.create_upload_url(bucket, name, content_type=ctype, size=path.stat().st_size)
        async with httpx.AsyncClient(timeout=120) as s3:
            with path.open("rb") as f:
                r = await s3.post(post["url"], data=post["fields"], files={"file": (name, f, ctype)})
        if r.status_code >= 300:
            raise FluxbaseError(r.status_code, "STORAGE_UPLOAD_FAILED", r.text[:200])
        out = await self.client.request(
            "POST",
            "/api/storage/upload-url/confirm",
            json_body={"projectId": self._pid, "fileId": post["file"]["id"]},
            idempotent=True,
        )
        return dict(out["file"])

    async def list(
        self, bucket: str, *, prefix: str = "", limit: int = 100, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page: files and nextCursor."""
        params = {
            "projectId": self._pid,
            "bucketId": bucket,
            "prefix": prefix,
            "limit": limit,
            "cursor": cursor,
        }
        return dict(await self.client.request("GET", "/api/storage/files", params=params))

    async def download_url(self, s3_key: str, *, expires_in: int | None = None) -> str:
        params = {"projectId": self._pid, "s3Key": s3_key, "expiresIn": expires_in}
        out = await self.client.request("GET", "/api/storage/url", params=params)
        return str(out["url"])

    async def download(self, s3_key: str, dest: str | Path) -> Path:
        """Stream a file to disk through its presigned URL."""
        url = await self.download_url(s3_key)
        dest = Path(dest)
        async with httpx.AsyncClient(timeout=120) as h, h.stream("GET", url) as r:
            r.raise_for_status()
            with dest.open("wb") as f:
                async for chunk in r.aiter_bytes(CHUNK):
                    f.write(chunk)
        return dest

    async def remove(self, *s3_keys: str) -> dict[str, Any]:
        body = {"projectId": self._pid, "s3Keys": list(s3_keys)}
        return dict(
            await self.client.request("DELETE", "/api/storage/files", json_body=body, idempotent=True)
        )


def _q(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', "%22").replace("\r", "").replace("\n", "")


def _field(boundary: str, name: str, value: str) -> bytes:
    return f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
