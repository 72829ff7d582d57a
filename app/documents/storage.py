"""Object storage behind one interface: any S3-compatible endpoint, or a local directory (embedded).

The documents feature builds uploads and downloads on this seam; for now the service checks it is reachable.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.settings import Settings


class ObjectStore(Protocol):
    name: str

    async def check(self) -> None:
        """Raise when the store cannot take writes."""


class LocalDiskStore:
    name = "local-disk"

    def __init__(self, root: Path) -> None:
        self.root = root

    async def check(self) -> None:
        await asyncio.to_thread(self._probe)

    def _probe(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=self.root, prefix=".probe-")
        os.close(fd)
        os.unlink(path)


class S3Store:
    name = "s3"

    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            aws_access_key_id=settings.s3_access_key,
            aws_secret_access_key=settings.s3_secret_key,
            region_name=settings.s3_region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=5,
                retries={"max_attempts": 1},
            ),
        )

    async def check(self) -> None:
        await asyncio.to_thread(self._client.head_bucket, Bucket=self.bucket)

    async def ensure_bucket(self) -> None:
        def create() -> None:
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError:
                self._client.create_bucket(Bucket=self.bucket)

        await asyncio.to_thread(create)


STORE_ERRORS = (OSError, BotoCoreError, ClientError)


def object_store(settings: Settings) -> LocalDiskStore | S3Store:
    return S3Store(settings) if settings.s3_endpoint_url else LocalDiskStore(settings.objects_dir)
