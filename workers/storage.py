"""One small object-storage interface with two backends: a local folder and S3 (any S3-compatible endpoint).

Keys are relative POSIX paths under the storage's root. Every write returns the SHA-256 of what was
written, computed by us while streaming, so ledgers and manifests never depend on ETags.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Callable
from urllib.parse import unquote, urlparse

from boto3.exceptions import Boto3Error
from botocore.exceptions import (BotoCoreError, ClientError, ConnectionClosedError, ConnectTimeoutError,
                                 EndpointConnectionError, IncompleteReadError, NoCredentialsError,
                                 PartialCredentialsError, ReadTimeoutError, ResponseStreamingError)

CHUNK = 1 << 20
BODY_ATTEMPTS = 5  # reads of a response body cut off mid-stream (on top of botocore's request retries)
WRITE_TOKEN = "qvlm-write"  # object metadata: a random token per conditional write, to recognise our own retry
TMP_MARK = ".qvlm-tmp-"
PROBE_PREFIX = ".qvlm-probe/"
_BODY_ERRORS = (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError)
_BAD_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


class StorageError(Exception):
    """A storage operation failed; the message names the URI or key and how to fix it."""


class AlreadyExists(StorageError):
    """A write with ``if_absent=True`` found the key already there."""


class NotFound(StorageError):
    """The key (or bucket) does not exist."""


class BucketNotFound(NotFound):
    """The S3 bucket does not exist."""


# --- secrets ---------------------------------------------------------------------------------------

_REDACTIONS = [
    # presigned URL query strings (SigV4 and SigV2)
    (re.compile(r"\?[^\s'\"]*(?:X-Amz-|Signature=|AWSAccessKeyId=)[^\s'\"]*", re.I), "?[REDACTED]"),
    (re.compile(r"(?:X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId)=[^&\s'\"]+", re.I),
     "[REDACTED]"),
    # name=value / name: value pairs of well-known secret settings
    # (also header forms, 'X-Amz-Security-Token': '...', as botocore's debug logs print them)
    (re.compile(r"((?:aws_)?(?:secret[-_]access[-_]key|session[-_]token|security[-_]token|secret[-_]key|"
                r"access[-_]key[-_]id)['\"]?\s*[=:]\s*['\"]?)[^\s'\",;&]+", re.I), r"\1[REDACTED]"),
    # access key ids
    (re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{16}\b"), "[REDACTED]"),
    # session tokens: very long base64 runs
    (re.compile(r"[A-Za-z0-9/+]{100,}={0,2}"), "[REDACTED]"),
]
_SECRET_40 = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


def redact(text: str) -> str:
    """Remove anything that looks like an AWS access key, secret key, session token or presigned query."""
    for pattern, repl in _REDACTIONS:
        text = pattern.sub(repl, text)
    # a 40-char base64 run is a secret key unless it is plain lowercase hex (a SHA-1, a git commit)
    return _SECRET_40.sub(lambda m: m[0] if re.fullmatch(r"[0-9a-f]{40}", m[0]) else "[REDACTED]", text)


# --- keys ------------------------------------------------------------------------------------------

def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative POSIX path, else raise ValueError naming it."""
    if not isinstance(key, str) or not key or key.startswith("/") or _BAD_KEY_CHARS.search(key):
        raise ValueError(f"invalid storage key {key!r}: keys are non-empty relative POSIX paths "
                         "without backslashes or control characters")
    parts = key.split("/")
    if any(p in ("..", ".") for p in parts) or "" in parts[:-1]:
        raise ValueError(f"invalid storage key {key!r}: '.', '..' and empty path segments are not allowed")
    if parts[-1] == "":
        raise ValueError(f"invalid storage key {key!r}: a key cannot end with '/'")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key that may end with '/'."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _hash_stream(src: BinaryIO, sink: Callable[[bytes], object] | None = None) -> tuple[str, int]:
    digest, total = hashlib.sha256(), 0
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        total += len(chunk)
        if sink is not None:
            sink(chunk)
    return digest.hexdigest(), total


def _verify(key: str, data: bytes, sha256: str | None) -> bytes:
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise StorageError(f"checksum mismatch for {key}: the object changed or is corrupt; re-write it")
    return data


def _check_range(key: str, start: int, end: int) -> None:
    if start < 0 or end < start:
        raise ValueError(f"invalid byte range [{start}, {end}) for {key}")


class Storage:
    """The interface both backends implement. ``reads`` records (key, start, end) of every read."""

    uri: str

    def __init__(self, uri: str):
        self.uri = uri
        self.reads: list[tuple[str, int, int]] = []

    def _where(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> str:
        raise NotImplementedError

    def put_file(self, key: str, path: str | Path) -> str:
        raise NotImplementedError

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        raise NotImplementedError

    def get_range(self, key: str, start: int, end: int) -> bytes:
        raise NotImplementedError

    def download(self, key: str, dest: str | Path, sha256: str | None = None) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def size(self, key: str) -> int:
        raise NotImplementedError

    def modified_at(self, key: str) -> float:
        """When ``key`` was last written, in seconds since the epoch, as the storage reports it (the file's
        mtime; S3's LastModified, by the server's clock)."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under ``prefix`` (an empty prefix is refused: it would wipe the root)."""
        if not prefix:
            raise ValueError(f"refusing to delete everything under {self.uri}: give a non-empty prefix")
        for key in self.list(check_prefix(prefix)):
            self.delete(key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


# --- local folder ----------------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _download_via_temp(key: str, dest: str | Path, sha256: str | None, fill) -> None:
    """``fill(tmp)`` writes the object beside ``dest`` and returns its sha256; a verified file is moved into place,
    so ``dest`` never holds a partial or corrupt copy."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{TMP_MARK}{dest.name}.{uuid.uuid4().hex}"
    try:
        got = fill(tmp)
        if sha256 is not None and got != sha256.lower():
            raise StorageError(f"checksum mismatch for {key}: the object changed or is corrupt; re-write it")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


class LocalStorage(Storage):
    """A folder on a local or shared filesystem; every write is atomic (temp file, fsync, rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        super().__init__(str(self.root))

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write(self, key: str, fill: Callable[[BinaryIO], str], if_absent: bool) -> str:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{TMP_MARK}{final.name}.{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                sha = fill(f)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                try:
                    os.link(tmp, final)  # fails atomically if the key exists
                except FileExistsError:
                    raise AlreadyExists(f"{self._where(key)} already exists; refusing to overwrite it") from None
            else:
                os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            raise StorageError(f"cannot write {self._where(key)}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return sha

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> str:
        def fill(f: BinaryIO) -> str:
            f.write(data)
            return hashlib.sha256(data).hexdigest()
        return self._write(key, fill, if_absent)

    def put_file(self, key: str, path: str | Path) -> str:
        with open(path, "rb") as src:
            return self._write(key, lambda f: _hash_stream(src, f.write)[0], False)

    def _open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"{self._where(key)} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self._where(key)}: {exc.strerror or exc}") from None

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        with self._open(key) as f:
            data = f.read()
        self.reads.append((key, 0, len(data)))
        return _verify(key, data, sha256)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        _check_range(key, start, end)
        with self._open(key) as f:
            f.seek(start)
            data = f.read(end - start)
        self.reads.append((key, start, end))
        if len(data) != end - start:
            raise StorageError(f"byte range [{start}, {end}) is beyond the end of {self._where(key)}")
        return data

    def download(self, key: str, dest: str | Path, sha256: str | None = None) -> None:
        def fill(tmp: Path) -> str:
            with self._open(key) as src, open(tmp, "wb") as out:
                return _hash_stream(src, out.write)[0]

        _download_via_temp(key, dest, sha256, fill)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"{self._where(key)} does not exist")
        return path.stat().st_size

    def modified_at(self, key: str) -> float:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"{self._where(key)} does not exist")
        return path.stat().st_mtime

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        # walk only the deepest folder the prefix names, then filter like S3 (a plain string prefix)
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        keys = []
        for folder, _, files in os.walk(start):
            rel = Path(folder).relative_to(self.root).as_posix()
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(TMP_MARK) and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


# --- S3 --------------------------------------------------------------------------------------------

def _endpoint(endpoint_url: str | None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _client_config(endpoint: str | None, max_attempts: int):
    from botocore.config import Config

    return Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=10, read_timeout=60, max_pool_connections=16,
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
        s3={"addressing_style": "path"} if endpoint else None,
    )


def _error_code(exc: BaseException) -> tuple[str, int]:
    resp = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    return code, int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _root_cause(exc: BaseException) -> BaseException:
    """boto3's upload_file wraps ClientError in S3UploadFailedError; find the botocore error inside."""
    seen = exc
    while seen is not None:
        if isinstance(seen, (ClientError, BotoCoreError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


NO_CREDENTIALS = ("no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, "
                  "or an instance role")
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                    "TokenRefreshRequired", "InvalidClientTokenId"}
_UNSUPPORTED = {"NotImplemented", "InvalidArgument", "InvalidRequest", "InvalidHeader"}


class S3Storage(Storage):
    """``s3://bucket/prefix`` on AWS or any S3-compatible endpoint, through the standard credential chain."""

    def __init__(self, uri: str, endpoint_url: str | None = None, multipart_threshold: int = 64 << 20,
                 max_attempts: int = 8):
        import boto3
        from boto3.s3.transfer import TransferConfig

        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"invalid S3 URI {uri!r}: expected s3://bucket/prefix")
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        super().__init__(f"s3://{self.bucket}/{self.prefix}".rstrip("/"))
        self.endpoint = _endpoint(endpoint_url)
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, config=_client_config(self.endpoint, max_attempts))
        chunk = max(multipart_threshold, 5 << 20)  # S3's smallest part is 5 MiB
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=chunk,
                                       max_concurrency=8)
        self._conditional: bool | None = None  # whether the server honours IfNoneMatch="*"
        self._bucket_ok = False

    def _k(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _root(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    # errors

    def _translate(self, exc: BaseException, what: str, key: str | None) -> StorageError:
        exc = _root_cause(exc)
        where = self._where(key) if key else self.uri
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(NO_CREDENTIALS)
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
            return StorageError(f"cannot reach the S3 endpoint {self.endpoint or '(AWS default)'} for {where}: "
                                "check endpoint_url / AWS_ENDPOINT_URL and the network")
        code, status = _error_code(exc)
        if code == "NoSuchBucket":
            return self._no_bucket()
        if code == "InvalidRange" or status == 416:
            return StorageError(f"the requested byte range is beyond the end of {where}")
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            return NotFound(f"{where} does not exist")
        if code == "PreconditionFailed" or status == 412:
            return AlreadyExists(f"{where} already exists; refusing to overwrite it")
        if code in _BAD_CREDENTIALS:
            return StorageError(f"S3 rejected the credentials ({code}) for {where}: check AWS_ACCESS_KEY_ID/"
                                "AWS_SECRET_ACCESS_KEY, the profile or the role, and the endpoint")
        if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
            return StorageError(f"access denied to {where} ({what}): grant the credentials s3:GetObject/"
                                "PutObject/ListBucket/DeleteObject on the bucket")
        return StorageError(f"{what} {where} failed: {redact(str(exc))}")

    def _call(self, what: str, key: str | None, fn: Callable, **kwargs):
        try:
            return fn(**kwargs)
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            err = self._translate(exc, what, key)
        if type(err) is NotFound and not self._bucket_ok:
            self._check_bucket()  # a HEAD on a missing bucket answers a bare 404, like a missing key
        raise err

    def _no_bucket(self) -> BucketNotFound:
        return BucketNotFound(f"bucket '{self.bucket}' does not exist (create it or fix output.uri / model.path)")

    def _check_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            err = self._translate(exc, "check bucket", None)
            raise (self._no_bucket() if isinstance(err, NotFound) else err) from None
        self._bucket_ok = True

    # writes

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> str:
        sha = hashlib.sha256(data).hexdigest()
        args = dict(Bucket=self.bucket, Key=self._k(key), Body=data, Metadata={"sha256": sha})
        if not if_absent:
            self._call("write", key, self.client.put_object, **args)
        elif self._conditional_writes():
            # botocore retries a put whose response was lost; if the first try was applied, the retry gets
            # 412, so a token of this write tells our own earlier attempt from another writer
            token = uuid.uuid4().hex
            args["Metadata"][WRITE_TOKEN] = token
            try:
                self._call("write", key, self.client.put_object, IfNoneMatch="*", **args)
            except AlreadyExists:
                if self._head_if_any(key).get("Metadata", {}).get(WRITE_TOKEN) != token:
                    raise
        else:
            self._put_checked(key, args, sha)
        return sha

    def _head_if_any(self, key: str) -> dict:
        try:
            return self._head(key)
        except NotFound:
            return {}

    def _put_checked(self, key: str, args: dict, sha: str) -> None:
        """Check-then-put-then-verify, for servers that ignore IfNoneMatch (not atomic, but detects races)."""
        if self.exists(key):
            raise AlreadyExists(f"{self._where(key)} already exists; refusing to overwrite it")
        self._call("write", key, self.client.put_object, **args)
        head = self._call("check", key, self.client.head_object, Bucket=self.bucket, Key=args["Key"])
        if head.get("Metadata", {}).get("sha256") != sha:
            raise AlreadyExists(f"{self._where(key)} was written concurrently by another writer")

    def _conditional_writes(self) -> bool:
        if self._conditional is None:
            self._conditional = self._probe_conditional()
        return self._conditional

    def _probe_conditional(self) -> bool:
        """Write a probe object twice with IfNoneMatch="*": a server that honours it refuses the second."""
        key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        args = dict(Bucket=self.bucket, Key=self._k(key), Body=b"", IfNoneMatch="*")
        try:
            try:
                self.client.put_object(**args)
            except (BotoCoreError, ClientError) as exc:
                code, status = _error_code(exc)
                if code in _UNSUPPORTED or status == 501:
                    return False
                if code == "PreconditionFailed" or status == 412:
                    return True  # a retry of our own applied first put was refused: the header is honoured
                raise self._translate(exc, "write", key) from None
            try:
                self._call("write", key, self.client.put_object, **args)
                return False
            except AlreadyExists:
                return True
        finally:
            self.delete(key)

    def put_file(self, key: str, path: str | Path) -> str:
        # hashed in a first pass so the sha256 can travel as object metadata (sent before the first part)
        with open(path, "rb") as src:
            sha, size = _hash_stream(src)
        try:
            self._call("upload", key, self.client.upload_file, Filename=str(path), Bucket=self.bucket,
                       Key=self._k(key), ExtraArgs={"Metadata": {"sha256": sha}}, Config=self.transfer)
        except StorageError:
            # a multipart complete whose response was lost is retried and answered NoSuchUpload although
            # the object is whole; the object's own sha256 metadata and size say whether it is ours
            head = self._head_if_any(key)
            if head.get("Metadata", {}).get("sha256") != sha or int(head.get("ContentLength", -1)) != size:
                raise
        return sha

    # reads

    def _get_body(self, key: str, **kwargs) -> bytes:
        """GetObject and its body. botocore retries a request, but not a body cut off mid-stream (a dropped
        connection after the headers), so that is retried here."""
        def fetch() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key), **kwargs)["Body"].read()
        for attempt in range(BODY_ATTEMPTS - 1):
            try:
                return fetch()
            except _BODY_ERRORS:
                time.sleep(0.1 * 2**attempt)
        return fetch()

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        data = self._call("read", key, lambda: self._get_body(key))
        self.reads.append((key, 0, len(data)))
        return _verify(key, data, sha256)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        _check_range(key, start, end)
        self.reads.append((key, start, end))
        if start == end:
            return b""

        data = self._call("read", key, lambda: self._get_body(key, Range=f"bytes={start}-{end - 1}"))
        if len(data) != end - start:
            raise StorageError(f"byte range [{start}, {end}) is beyond the end of {self._where(key)}")
        return data

    def download(self, key: str, dest: str | Path, sha256: str | None = None) -> None:
        def fill(tmp: Path) -> str:
            self._call("download", key, self.client.download_file, Bucket=self.bucket, Key=self._k(key),
                       Filename=str(tmp), Config=self.transfer)
            with open(tmp, "rb") as f:
                return _hash_stream(f)[0]

        _download_via_temp(key, dest, sha256, fill)

    def _head(self, key: str) -> dict:
        return self._call("read", key, self.client.head_object, Bucket=self.bucket, Key=self._k(key))

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except BucketNotFound:
            raise
        except NotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def modified_at(self, key: str) -> float:
        return self._head(key)["LastModified"].timestamp()

    def list(self, prefix: str = "") -> list[str]:
        root = self._root()

        def walk() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + check_prefix(prefix))
            return [obj["Key"][len(root):] for page in pages for obj in page.get("Contents", [])]
        return sorted(self._call("list", prefix or None, walk))

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._k(key))

    def delete_prefix(self, prefix: str) -> None:
        if not prefix:
            raise ValueError(f"refusing to delete everything under {self.uri}: give a non-empty prefix")
        keys = self.list(check_prefix(prefix))
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = {"Objects": [{"Key": self._k(k)} for k in keys[i:i + 1000]], "Quiet": True}
            resp = self._call("delete", prefix, self.client.delete_objects, Bucket=self.bucket, Delete=batch)
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StorageError(f"could not delete {len(resp['Errors'])} objects under {self._where(prefix)}, "
                                   f"e.g. {first.get('Key')}: {redact(str(first.get('Message', '')))}")


def open_storage(uri: str, endpoint_url: str | None = None) -> Storage:
    """A Storage for a local path, a ``file://`` URL or an ``s3://bucket/prefix`` URI."""
    uri = str(uri)
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        return S3Storage(uri, endpoint_url)
    if scheme == "file":
        return LocalStorage(unquote(urlparse(uri).path))
    if scheme and len(scheme) > 1:  # one letter would be a Windows drive
        raise StorageError(f"unsupported storage URI {redact(uri)!r}: use a local path, file:// or s3://")
    return LocalStorage(uri)
