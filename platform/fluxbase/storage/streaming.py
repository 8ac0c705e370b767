"""Streaming mechanics for uploads: a multipart/form-data reader and an S3 multipart writer.

Neither holds a whole file: the reader turns request chunks into part events as they arrive
(python-multipart's push parser), and the writer cuts the bytes into S3 parts of
`part_size`, uploading at most `max_in_flight` parts at a time. Peak memory is therefore
about (max_in_flight + 1) * part_size, whatever the file size.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from fluxbase.errors import Conflict, StorageUnavailable, ValidationError
from fluxbase.storage.s3 import ObjectStore, s3_errors

MAX_FIELD_BYTES = 4096
MAX_PARTS = 32
MAX_HEADER_BYTES = 8192


@dataclass
class PartInfo:
    """One form part's headers: the field name, the file name (if a file) and its Content-Type."""

    name: str
    filename: str | None
    content_type: str | None


@dataclass
class FormEvent:
    kind: str  # "begin" | "data" | "end"
    part: PartInfo | None = None
    data: bytes = b""


def boundary_of(content_type: str | None) -> bytes:
    """The multipart boundary of a request's Content-Type, or a clear error."""
    ctype, options = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data":
        raise ValidationError(
            "Send the upload as multipart/form-data with the fields file, bucketId and projectId."
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise ValidationError("The multipart/form-data Content-Type has no boundary.")
    return boundary


def _decode_header(raw: bytes) -> str:
    # Browsers and curl send UTF-8 file names as raw bytes (RFC 7578 §4.2).
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("Form part headers must be UTF-8.") from None


def _part_info(headers: list[tuple[bytes, bytes]]) -> PartInfo:
    disposition = next((v for k, v in headers if k == b"content-disposition"), None)
    if disposition is None:
        raise ValidationError("A form part has no Content-Disposition header.")
    kind, options = parse_options_header(_decode_header(disposition).encode("utf-8").decode("latin-1"))
    if kind != b"form-data" or b"name" not in options:
        raise ValidationError('Every form part needs Content-Disposition: form-data; name="...".')
    name = _decode_header(options[b"name"])
    filename = _decode_header(options[b"filename"]) if b"filename" in options else None
    ctype_raw = next((v for k, v in headers if k == b"content-type"), None)
    return PartInfo(name, filename, _decode_header(ctype_raw).strip() if ctype_raw is not None else None)


class FormReader:
    """Feeds request chunks to python-multipart and yields begin/data/end events in order."""

    def __init__(self, boundary: bytes):
        self._events: list[FormEvent] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._hname = bytearray()
        self._hvalue = bytearray()
        self._parts = 0
        self._done = False
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
            max_header_size=MAX_HEADER_BYTES,
        )

    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise ValidationError(f"Too many form parts (at most {MAX_PARTS}).")
        self._headers = []

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _on_header_end(self) -> None:
        self._headers.append((bytes(self._hname).strip().lower(), bytes(self._hvalue).strip()))
        self._hname.clear()
        self._hvalue.clear()

    def _on_headers_finished(self) -> None:
        self._events.append(FormEvent("begin", part=_part_info(self._headers)))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if end > start:
            self._events.append(FormEvent("data", data=data[start:end]))

    def _on_part_end(self) -> None:
        self._events.append(FormEvent("end"))

    def _on_end(self) -> None:
        self._done = True

    async def events(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[FormEvent]:
        """Parse the body as it streams in; a malformed or truncated body is a VALIDATION_ERROR."""
        try:
            async for chunk in chunks:
                self._parser.write(chunk)
                pending, self._events = self._events, []
                for event in pending:
                    yield event
            self._parser.finalize()
        except (MultipartParseError, FormParserError):
            raise ValidationError("The multipart/form-data body is malformed.") from None
        for event in self._events:
            yield event
        self._events = []
        if not self._done:
            raise ValidationError("The multipart/form-data body ended before its closing boundary.")


class FileTooLarge(Exception):
    """More bytes arrived than the writer's cap allows."""


@dataclass
class S3Writer:
    """Writes one object: a single PUT when it fits in one part, else an S3 multipart upload.

    `finish()` uploads everything but commits nothing; `commit()` makes the object appear
    atomically (PutObject or CompleteMultipartUpload); `abort()` leaves no trace.
    """

    store: ObjectStore
    key: str
    content_type: str
    part_size: int
    cap: int
    max_in_flight: int = 2
    size: int = 0
    # The part being filled. Written chunk by chunk (never joined), it is handed to botocore as is:
    # bytes would be wrapped in a BytesIO that aiohttp then copies, doubling every part in memory.
    _part: io.BytesIO = field(default_factory=io.BytesIO)
    _upload_id: str | None = None
    _etags: dict[int, str] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _slots: asyncio.Semaphore | None = None
    _tail: io.BytesIO | None = None
    _committed: bool = False
    _next_part: int = 1
    _failure: BaseException | None = None

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.cap:
            raise FileTooLarge()
        self._part.write(data)
        if self._part.tell() >= self.part_size:
            await self._flush_part()

    async def _flush_part(self) -> None:
        body, self._part = self._part, io.BytesIO()
        body.seek(0)
        if self._upload_id is None:
            with s3_errors():
                created = await self.store.client.create_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, ContentType=self.content_type
                )
            self._upload_id = created["UploadId"]
            self._slots = asyncio.Semaphore(self.max_in_flight)
        assert self._slots is not None
        self._raise_failed()
        await self._slots.acquire()  # backpressure: stop reading while max_in_flight parts are uploading
        number, self._next_part = self._next_part, self._next_part + 1
        task = asyncio.create_task(self._upload_part(number, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._remember_failure)
        del body

    def _remember_failure(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()

    def _raise_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _upload_part(self, number: int, body: io.BytesIO) -> None:
        assert self._slots is not None
        try:
            with s3_errors():
                resp = await self.store.client.upload_part(
                    Bucket=self.store.bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    PartNumber=number,
                    Body=body,
                )
            self._etags[number] = resp["ETag"]
        finally:
            self._slots.release()

    async def finish(self) -> int:
        """Upload what is buffered (all parts, none committed); return the object's size."""
        if self._upload_id is None:
            self._tail, self._part = self._part, io.BytesIO()
            self._tail.seek(0)
        elif self._part.tell():
            await self._flush_part()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._raise_failed()
        return self.size

    async def commit(self) -> None:
        """Make the object visible in S3 in one step."""
        with s3_errors():
            if self._upload_id is None:
                await self.store.client.put_object(
                    Bucket=self.store.bucket,
                    Key=self.key,
                    Body=self._tail or io.BytesIO(),
                    ContentType=self.content_type,
                )
            else:
                parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in sorted(self._etags)]
                await self.store.client.complete_multipart_upload(
                    Bucket=self.store.bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
        self._tail = None
        self._committed = True

    async def abort(self) -> None:
        """Drop uploaded parts; best effort (housekeeping aborts what this cannot)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._part = io.BytesIO()
        self._tail = None
        if self._upload_id is not None and not self._committed:
            with contextlib.suppress(Exception):
                await self.store.client.abort_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self._upload_id
                )


@contextlib.contextmanager
def _changed_is_conflict() -> Iterator[None]:
    try:
        yield
    except StorageUnavailable as exc:
        code = getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "412"):
            raise Conflict(
                "The uploaded object changed while it was being confirmed; confirm again."
            ) from None
        raise


async def copy_object(
    store: ObjectStore, source: str, target: str, size: int, content_type: str, *, if_match: str | None = None
) -> None:
    """Server-side copy inside the platform bucket (multipart copy past S3's 5 GiB single-copy limit).

    With `if_match` (an ETag), only that version of the source is copied; if it changed, S3
    refuses and this raises CONFLICT.
    """
    client: Any = store.client
    src = {"Bucket": store.bucket, "Key": source}
    cond = {"CopySourceIfMatch": if_match} if if_match else {}
    single_limit = 5 * 1024**3
    with _changed_is_conflict(), s3_errors():
        if size <= single_limit:
            await client.copy_object(
                Bucket=store.bucket,
                Key=target,
                CopySource=src,
                ContentType=content_type,
                MetadataDirective="REPLACE",
                **cond,
            )
            return
        created = await client.create_multipart_upload(
            Bucket=store.bucket, Key=target, ContentType=content_type
        )
        upload_id = created["UploadId"]
        try:
            part = 1024**3
            parts = []
            for number, start in enumerate(range(0, size, part), start=1):
                end = min(start + part, size) - 1
                resp = await client.upload_part_copy(
                    Bucket=store.bucket,
                    Key=target,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=src,
                    CopySourceRange=f"bytes={start}-{end}",
                    **cond,
                )
                parts.append({"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]})
            await client.complete_multipart_upload(
                Bucket=store.bucket, Key=target, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await client.abort_multipart_upload(Bucket=store.bucket, Key=target, UploadId=upload_id)
            raise
