"""One long-lived aioboto3 S3 client per process; botocore errors are wrapped at this boundary."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import aioboto3
import aiohttp
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from fluxbase.config import S3Settings
from fluxbase.errors import StorageUnavailable
from fluxbase.metrics import S3_ERRORS

log = logging.getLogger("fluxbase.storage")


class ObjectStore:
    """The platform bucket; every object key starts with a project id."""

    def __init__(self, settings: S3Settings):
        self.settings = settings
        self.bucket = settings.bucket
        self._stack = contextlib.AsyncExitStack()
        self.client: Any = None
        # Signs URLs for clients: the same client unless a public endpoint is configured.
        self.presigner: Any = None

    async def start(self) -> None:
        session = aioboto3.Session()
        self.client = await self._open(session, self.settings.endpoint_url)
        public = self.settings.public_endpoint_url
        self.presigner = self.client
        if public and public != self.settings.endpoint_url:
            self.presigner = await self._open(session, public)

    async def _open(self, session: aioboto3.Session, endpoint_url: str) -> Any:
        return await self._stack.enter_async_context(
            session.client(
                "s3",
                endpoint_url=endpoint_url,
                aws_access_key_id=self.settings.access_key,
                aws_secret_access_key=self.settings.secret_key,
                region_name=self.settings.region,
                config=Config(
                    signature_version="s3v4",
                    s3={"addressing_style": "path"},
                    connect_timeout=3,
                    read_timeout=30,
                    retries={"max_attempts": 2, "mode": "standard"},
                ),
            )
        )

    async def close(self) -> None:
        await self._stack.aclose()

    async def ensure_bucket(self) -> None:
        try:
            await self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise StorageUnavailable() from exc
            with contextlib.suppress(ClientError):  # created concurrently by another process
                await self.client.create_bucket(Bucket=self.bucket)
        except (BotoCoreError, OSError) as exc:
            raise StorageUnavailable() from exc

    async def ping(self) -> bool:
        try:
            await self.client.head_bucket(Bucket=self.bucket)
            return True
        except (ClientError, BotoCoreError, OSError):
            S3_ERRORS.inc("unreachable")
            return False


class ObjectMissing(Exception):
    """S3 says the key does not exist (NoSuchKey / 404)."""


_MISSING_CODES = ("NoSuchKey", "404", "NotFound", "NoSuchUpload")


@contextlib.contextmanager
def s3_errors() -> Iterator[None]:
    """Map botocore/aiohttp failures to ObjectMissing or StorageUnavailable (the cause goes to the log)."""
    try:
        yield
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in _MISSING_CODES:
            raise ObjectMissing() from exc
        log.warning("S3 request failed: %s", exc.response.get("Error", {}).get("Code"))
        S3_ERRORS.inc("error_answer")
        raise StorageUnavailable() from exc
    except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
        log.warning("S3 unreachable: %r", exc)
        S3_ERRORS.inc("unreachable")
        raise StorageUnavailable() from exc
