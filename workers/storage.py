"""One small object-storage interface with two backends: a local folder and S3 (any S3-compatible endpoint).

Keys are relative POSIX paths under the storage's root. Every write returns the SHA-256 of what was
written, computed by us while streaming, so ledgers and manifests never depend on ETags.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator
from urllib.parse import unquote, urlparse

from boto3.exceptions import Boto3Error
from botocore.exceptions import (BotoCoreError, ClientError, ConnectionClosedError, ConnectTimeoutError,
                                 EndpointConnectionError, IncompleteReadError, NoCredentialsError,
                                 PartialCredentialsError, ReadTimeoutError, ResponseStreamingError)

from qvlm.errors import StorageError as BaseStorageError

CHUNK = 1 << 20
BODY_ATTEMPTS = 5  # reads of a response body cut off mid-stream (on top of botocore's request retries)
WRITE_TOKEN = "qvlm-write"  # object metadata: a random token per conditional write, to recognise our own retry
TMP_MARK = ".qvlm-tmp-"
PROBE_PREFIX = ".qvlm-probe/"
LEDGER_PREFIX = "_qvlm/written/"  # one ledger per writer: the keys it wrote, each listed before it is written
_BODY_ERRORS = (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError)
_BAD_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


class StorageError(BaseStorageError):
    """A storage operation failed; the message names the URI or key and how to fix it."""


class AlreadyExists(StorageError):
    """A write with ``if_absent=True`` found the key already there."""


class NotFound(StorageError):
    """The key (or bucket) does not exist."""


class BucketNotFound(NotFound):
    """The S3 bucket does not exist."""


class UnsafePath(StorageError):
    """A folder or file inside a local storage root is a symbolic link (or the root cannot be resolved):
    qvlm never follows a link below the root, so nothing is read or written outside it (exit 2)."""

    category = "input"


# --- secrets ---------------------------------------------------------------------------------------

_REDACTIONS = [
    # user:password@ in a URL (an endpoint_url, an address); the scheme and host stay readable
    (re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@"), r"\1[REDACTED]@"),
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
    """Remove anything that looks like an AWS access key, secret key, session token, presigned query or the
    ``user:password@`` of a URL."""
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
    """The interface both backends implement. ``reads`` records (key, start, end) of every read.

    Backends implement ``_put_bytes``, ``_put_file`` and ``_delete``; the public writes go through the ledger
    when one is kept (see :meth:`keep_ledger`)."""

    uri: str

    def __init__(self, uri: str):
        self.uri = uri
        self.reads: list[tuple[str, int, int]] = []
        self.ledger: str | None = None  # this writer's ledger key, when it keeps one
        self._claimed: set[str] = set()
        self._ledger_lock = threading.Lock()

    def _where(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    # the ledger

    def keep_ledger(self) -> "Storage":
        """From now on, list every key this object writes in its own ledger (``_qvlm/written/<id>.json``),
        before the key itself is written: whatever happens to the run, a later one knows which files of the
        output qvlm wrote, and never deletes or overwrites any other."""
        self.ledger = f"{LEDGER_PREFIX}{uuid.uuid4().hex}.json"
        return self

    def _claim(self, key: str) -> bool:
        """List ``key`` in the ledger before it is written; True if it was not listed yet."""
        with self._ledger_lock:
            if self.ledger is None or key in self._claimed:
                return False
            self._claimed.add(check_key(key))
            self._save_ledger()
            return True

    def _unclaim(self, key: str) -> None:
        """Take a key this object no longer holds (deleted, or a conditional write that lost) off the ledger."""
        with self._ledger_lock:
            if key not in self._claimed:
                return
            self._claimed.discard(key)
            if self._claimed:
                self._save_ledger()
            else:
                self._delete(self.ledger)

    def _save_ledger(self) -> None:
        self._put_bytes(self.ledger, json.dumps({"keys": sorted(self._claimed)}, indent=0).encode(), False)

    # writes: listed in the ledger first

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> str:
        new = self._claim(key)
        try:
            return self._put_bytes(key, data, if_absent)
        except AlreadyExists:
            if new:
                self._unclaim(key)  # someone else's object: not ours to list
            raise

    def put_file(self, key: str, path: str | Path) -> str:
        self._claim(key)
        return self._put_file(key, path)

    def delete(self, key: str) -> None:
        self._delete(key)
        self._unclaim(key)

    # what each backend provides

    def _put_bytes(self, key: str, data: bytes, if_absent: bool) -> str:
        raise NotImplementedError

    def _put_file(self, key: str, path: str | Path) -> str:
        raise NotImplementedError

    def _delete(self, key: str) -> None:
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


# --- local folder ----------------------------------------------------------------------------------

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


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LocalStorage(Storage):
    """A folder on a local or shared filesystem; every write is atomic (temp file, fsync, rename).

    The root is resolved once, here (it may itself be a link the user made); below it every folder and file
    is written, deleted and (unless ``follow_links``) read or listed relative to its parent's descriptor with
    ``O_NOFOLLOW``, so a symbolic link planted inside an output (``_qvlm -> /elsewhere``) is refused, never
    followed. ``follow_links`` is for reading a model: a Hugging Face cache snapshot is a folder of links."""

    def __init__(self, root: str | Path, follow_links: bool = False):
        given = Path(root).expanduser().absolute()
        super().__init__(str(given))
        self.follow_links = follow_links
        try:
            self.root = given.resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            raise UnsafePath(f"{given}: cannot resolve the path ({exc}); remove the symbolic link loop or "
                             "choose another folder") from None

    def _refusal(self, dir_fd: int, name: str, where: str, exc: OSError) -> StorageError:
        """Why ``name`` in the open folder could not be opened without following links: a link (refused), a
        missing entry or a file where a folder is needed (not found), or the system's own reason."""
        try:
            if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                return self._link_refused_at(where)
        except OSError:
            pass
        if isinstance(exc, FileNotFoundError):
            return NotFound(f"{where} does not exist")
        if isinstance(exc, NotADirectoryError):
            return NotFound(f"{where} is not a folder")
        return StorageError(f"cannot open {where}: {exc.strerror or exc}")

    def _link_refused_at(self, where: str) -> UnsafePath:
        return UnsafePath(f"{where} is a symbolic link; qvlm never follows links inside {self.uri}: "
                          "remove the link or choose another folder")

    @contextmanager
    def _folder(self, key: str, create: bool) -> Iterator[tuple[int, str]]:
        """(descriptor of the folder that holds ``key``, the key's last name), reached from the root one
        component at a time without following links; missing folders are made when ``create``."""
        *folders, name = check_key(key).split("/")
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.root, _DIR_FLAGS)
        except FileNotFoundError:
            raise NotFound(f"{self._where(key)} does not exist") from None
        try:
            for i, folder in enumerate(folders):
                child = self._enter(fd, folder, create, self._where("/".join(folders[:i + 1])))
                os.close(fd)
                fd = child
            yield fd, name
        finally:
            os.close(fd)

    def _enter(self, dir_fd: int, folder: str, create: bool, where: str) -> int:
        """A descriptor of ``folder`` in the open folder, never through a link; made first when ``create`` (twice
        at most: another writer may remove a folder it emptied between our mkdir and our open)."""
        for attempt in range(2):
            if create:
                try:
                    os.mkdir(folder, dir_fd=dir_fd)
                except FileExistsError:
                    pass
            try:
                return os.open(folder, _DIR_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError as exc:
                if not create or attempt:
                    raise self._refusal(dir_fd, folder, where, exc) from None
            except OSError as exc:
                raise self._refusal(dir_fd, folder, where, exc) from None
        raise AssertionError("unreachable")

    def _put(self, key: str, fill: Callable[[BinaryIO], str], if_absent: bool) -> str:
        try:
            with self._folder(key, create=True) as (dir_fd, name):
                return self._put_in(dir_fd, name, key, fill, if_absent)
        except NotFound as exc:
            raise StorageError(f"cannot write {self._where(key)}: {exc}") from None
        except OSError as exc:
            raise StorageError(f"cannot write {self._where(key)}: {exc.strerror or exc}") from None

    def _put_in(self, dir_fd: int, name: str, key: str, fill: Callable[[BinaryIO], str], if_absent: bool) -> str:
        tmp = f"{TMP_MARK}{name}.{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                sha = fill(f)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                try:  # fails atomically if the key exists (a link there included: it is never followed)
                    os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                except FileExistsError:
                    raise AlreadyExists(f"{self._where(key)} already exists; refusing to overwrite it") from None
            else:
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # replaces a link, never its target
            os.fsync(dir_fd)
        finally:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
        return sha

    def _put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> str:
        def fill(f: BinaryIO) -> str:
            f.write(data)
            return hashlib.sha256(data).hexdigest()
        return self._put(key, fill, if_absent)

    def _put_file(self, key: str, path: str | Path) -> str:
        with open(path, "rb") as src:
            return self._put(key, lambda f: _hash_stream(src, f.write)[0], False)

    def _open(self, key: str) -> BinaryIO:
        if self.follow_links:
            try:
                return open(self.root / check_key(key), "rb")
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise NotFound(f"{self._where(key)} does not exist") from None
            except OSError as exc:
                raise StorageError(f"cannot read {self._where(key)}: {exc.strerror or exc}") from None
        try:
            with self._folder(key, create=False) as (dir_fd, name):
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                except OSError as exc:
                    raise self._refusal(dir_fd, name, self._where(key), exc) from None
        except NotFound:
            raise NotFound(f"{self._where(key)} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self._where(key)}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotFound(f"{self._where(key)} does not exist (it is not a file)")
        return os.fdopen(fd, "rb")

    def _stat(self, key: str) -> os.stat_result | None:
        """The key's own status (a link is not followed unless ``follow_links``), or None if it or a folder above
        it is missing."""
        if self.follow_links:
            try:
                return os.stat(self.root / check_key(key))
            except (FileNotFoundError, NotADirectoryError):
                return None
        try:
            with self._folder(key, create=False) as (dir_fd, name):
                return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except (NotFound, FileNotFoundError):
            return None

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
        found = self._stat(key)
        return found is not None and stat.S_ISREG(found.st_mode)

    def size(self, key: str) -> int:
        return self._file_stat(key).st_size

    def modified_at(self, key: str) -> float:
        return self._file_stat(key).st_mtime

    def _file_stat(self, key: str) -> os.stat_result:
        found = self._stat(key)
        if found is None or not stat.S_ISREG(found.st_mode):
            raise NotFound(f"{self._where(key)} does not exist")
        return found

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` like S3 lists them (a plain string prefix). Unless ``follow_links``, a symbolic
        link anywhere in the listing is refused, naming it (a link is never descended into either way)."""
        check_prefix(prefix)
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        found = self._stat(folder) if folder else None
        if folder and found is not None and stat.S_ISLNK(found.st_mode):
            raise self._link_refused(folder)
        if folder and (found is None or not stat.S_ISDIR(found.st_mode)):
            return []
        keys = []
        for here, dirs, files in os.walk(self.root / folder if folder else self.root):
            rel = Path(here).relative_to(self.root).as_posix()
            for name in files + dirs:
                key = name if rel == "." else f"{rel}/{name}"
                is_link = os.path.islink(os.path.join(here, name))
                if is_link and not self.follow_links and key.startswith(prefix):
                    raise self._link_refused(key)
                if name in files and not name.startswith(TMP_MARK) and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def _link_refused(self, key: str) -> UnsafePath:
        return self._link_refused_at(self._where(key))

    def _delete(self, key: str) -> None:
        try:
            with self._folder(key, create=False) as (dir_fd, name):
                os.unlink(name, dir_fd=dir_fd)  # a link is removed itself, never its target
        except (NotFound, FileNotFoundError):
            return
        except OSError as exc:
            raise StorageError(f"cannot delete {self._where(key)}: {exc.strerror or exc}") from None
        self._prune(key.split("/")[:-1])

    def _prune(self, folders: list[str]) -> None:
        """Remove the folders above a deleted key that it left empty, deepest first, never the root: like S3,
        an output holds folders only while they hold files."""
        for depth in range(len(folders), 0, -1):
            try:
                with self._folder("/".join([*folders[:depth - 1], "_"]), create=False) as (dir_fd, _):
                    os.rmdir(folders[depth - 1], dir_fd=dir_fd)
            except (OSError, StorageError):
                return


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
        try:
            self.client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint, config=_client_config(self.endpoint, max_attempts))
        except ValueError as exc:  # botocore: "Invalid endpoint: <the URL as given>"
            raise StorageError(f"invalid S3 endpoint {redact(str(self.endpoint))} for {self.uri} "
                               f"({redact(str(exc))}); fix output.endpoint_url / AWS_ENDPOINT_URL") from None
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
            return StorageError(f"cannot reach the S3 endpoint {redact(self.endpoint or '(AWS default)')} for {where}: "
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

    def _put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> str:
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
            self._delete(key)

    def _put_file(self, key: str, path: str | Path) -> str:
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

    def _delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._k(key))


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


def open_model(uri: str, endpoint_url: str | None = None) -> Storage:
    """The storage of a model, for reading: links inside a local model folder are followed (a Hugging Face
    cache snapshot is a folder of links into its blobs). qvlm never writes there."""
    storage = open_storage(uri, endpoint_url)
    if isinstance(storage, LocalStorage):
        storage.follow_links = True
    return storage


def open_output(uri: str, endpoint_url: str | None = None) -> Storage:
    """The storage of a job's output, for a writer: every key it writes is listed first in its own ledger
    (:meth:`Storage.keep_ledger`), so qvlm can always tell its own files from the user's."""
    return open_storage(uri, endpoint_url).keep_ledger()
