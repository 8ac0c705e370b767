"""Upload throughput: through the Fluxbase API vs. straight to S3, on this machine.

One invocation starts an embedded PostgreSQL and S3 (SeaweedFS `weed mini`) and a Fluxbase
API, writes one file of --size MiB, then uploads it --repeat times each way:
  * s3 direct: aioboto3 `upload_fileobj` to the same S3 (multipart, same part size),
  * presigned POST: the file POSTed straight to S3 with a form from /api/storage/upload-url,
  * api fields-first: multipart/form-data to /api/storage/upload, bucketId/projectId before
    the file (the body streams to the final key),
  * api file-first: the reference doc's curl field order (the body streams to a staging key,
    then a server-side copy moves it).
Prints MiB/s (best and median) and the ratio to S3 direct. Client, API and S3 share the CPU
cores of this machine, so the numbers are a floor for a deployment with separate hosts.

    .venv/bin/python bench/storage_upload.py [--size 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
from boto3.s3.transfer import TransferConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fluxbase.config import S3Settings  # noqa: E402
from fluxbase.devstack.procs import free_port  # noqa: E402
from fluxbase.storage.s3 import ObjectStore  # noqa: E402
from support import run_service, start_stack, stop_stack  # noqa: E402

MIB = 1024 * 1024
BOUNDARY = "fluxbase-bench-boundary"


def form_parts(project_id: str, bucket: str, name: str) -> tuple[bytes, bytes, bytes]:
    meta = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in (("bucketId", bucket), ("projectId", project_id))
    )
    file_head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return meta, file_head, f"--{BOUNDARY}--\r\n".encode()


async def file_chunks(path: Path, chunk: int = MIB) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while data := f.read(chunk):
            yield data


async def timed(fn: Callable[[], Awaitable[None]], size: int, repeat: int) -> list[float]:
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await fn()
        rates.append(size / MIB / (time.perf_counter() - t0))
    return rates


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=100, help="file size in MiB")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    size = args.size * MIB

    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-bench-"))
    stack = start_stack(tmp)
    try:
        source = tmp / "upload.bin"
        block = os.urandom(MIB)
        with source.open("wb") as f:
            for _ in range(args.size):
                f.write(block)
        dbname = await stack.create_database()
        port = free_port()
        env = stack.env(
            dbname,
            FLUXBASE_API_PORT=str(port),
            FLUXBASE_STORAGE_MAX_FILE_SIZE=str(size + MIB),
            FLUXBASE_STORAGE_QUOTA_BYTES=str(100 * size),
            FLUXBASE_RATE_LIMIT_REQUESTS="100000000",
        )
        with run_service(["api"], env, port, tmp) as server:
            api = httpx.AsyncClient(base_url=server.url, timeout=600)
            email = f"bench-{secrets.token_hex(4)}@example.com"
            await api.post("/api/auth/register", json={"email": email, "password": "bench password 1"})
            token = (
                await api.post("/api/auth/login", json={"email": email, "password": "bench password 1"})
            ).json()["token"]
            h = {"Authorization": f"Bearer {token}"}
            pid = (await api.post("/api/projects", json={"name": "bench"}, headers=h)).json()["project"]["id"]
            key = (
                await api.post(
                    f"/api/projects/{pid}/api-keys", json={"name": "bench", "scope": "admin"}, headers=h
                )
            ).json()["key"]
            auth = {"Authorization": f"Bearer {key}"}
            r = await api.post("/api/storage/buckets", json={"projectId": pid, "name": "bench"}, headers=auth)
            assert r.status_code == 201, r.text

            store = ObjectStore(
                S3Settings(
                    stack.s3_endpoint,
                    stack.s3_access_key,
                    stack.s3_secret_key,
                    bucket=env["FLUXBASE_S3_BUCKET"],
                )
            )
            await store.start()
            transfer = TransferConfig(multipart_chunksize=8 * MIB, max_concurrency=4)
            counter = iter(range(10_000))

            async def s3_direct() -> None:
                with source.open("rb") as f:
                    await store.client.upload_fileobj(
                        f, store.bucket, f"direct/{next(counter)}", Config=transfer
                    )

            async def presigned_post() -> None:
                grant = (
                    await api.post(
                        "/api/storage/upload-url",
                        headers=auth,
                        json={
                            "projectId": pid,
                            "bucketId": "bench",
                            "name": f"post-{next(counter)}.bin",
                            "size": size,
                        },
                    )
                ).json()
                with source.open("rb") as f:
                    resp = await api.post(grant["url"], data=grant["fields"], files={"file": ("f.bin", f)})
                assert resp.status_code in (200, 201, 204), resp.text
                done = await api.post(
                    "/api/storage/upload-url/confirm",
                    headers=auth,
                    json={"projectId": pid, "fileId": grant["file"]["id"]},
                )
                assert done.status_code == 200, done.text

            def through_api(file_first: bool) -> Callable[[], Awaitable[None]]:
                async def run() -> None:
                    meta, file_head, end = form_parts(pid, "bench", f"api-{next(counter)}.bin")

                    async def body() -> AsyncIterator[bytes]:
                        yield file_head if file_first else meta + file_head
                        async for chunk in file_chunks(source):
                            yield chunk
                        yield b"\r\n" + (meta if file_first else b"") + end

                    length = len(meta) + len(file_head) + size + 2 + len(end)
                    resp = await api.post(
                        "/api/storage/upload",
                        content=body(),
                        headers={
                            **auth,
                            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                            "Content-Length": str(length),
                        },
                    )
                    assert resp.status_code == 201 and resp.json()["file"]["size"] == size, resp.text

                return run

            await s3_direct()  # warm-up: connections, volumes
            results = {
                "s3 direct": await timed(s3_direct, size, args.repeat),
                "presigned POST": await timed(presigned_post, size, args.repeat),
                "api fields-first": await timed(through_api(False), size, args.repeat),
                "api file-first": await timed(through_api(True), size, args.repeat),
            }
            await store.close()
            await api.aclose()
        await stack.drop_database(dbname)
    finally:
        stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)

    base = max(results["s3 direct"])
    print(
        f"\nUpload of {args.size} MiB, best of {args.repeat}, cores={os.cpu_count()} "
        "(client, API and S3 on this machine)"
    )
    for name, rates in results.items():
        print(
            f"  {name:<17} {max(rates):7.1f} MiB/s best  {statistics.median(rates):7.1f} MiB/s median"
            f"   {max(rates) / base:6.1%} of s3 direct"
        )


if __name__ == "__main__":
    asyncio.run(main())
