"""One long-lived aioboto3 S3 client per process; botocore errors are wrapped at this boundary."""

from __future__ import annotations

import contextlib
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from fluxbase.config import S3Settings
from fluxbase.errors import StorageUnavailable


class ObjectStore:
    """The platform bucket; every object key starts with a project id."""

    def __init__(self, settings: S3Settings):
        self.settings = settings
        self.bucket = settings.bucket
        self._stack = contextlib.AsyncExitStack()
        self.client: Any = None

    async def start(self) -> None:
        session = aioboto3.Session()
        self.client = await self._stack.enter_async_context(
            session.client(
                "s3",
                endpoint_url=self.settings.endpoint_url,
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
            return False
