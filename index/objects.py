"""Where a store's image files live: its own folder (the default), or an object store named by an fsspec
URL (`resynth init --images s3://bucket/prefix`; also gs://, gcs://, az://, abfs://).

Why object storage: machines that share one PostgreSQL catalog need one place for the images they
generate; a bucket is that place without a shared filesystem. Only the URL is kept in store.json; the
endpoint and credentials come from the backend's standard environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE ...; GOOGLE_APPLICATION_CREDENTIALS; AZURE_...).
A URL that carries credentials (`s3://KEY:SECRET@bucket`) is refused.

Writes are atomic in both places. A folder writes beside the target, fsyncs and renames
(layout.atomic_write). An object store needs no temporary key: a PUT is atomic on S3, GCS and Azure
Blob (the object appears with its whole body or not at all, and a multipart upload appears only when
it completes), so an image is written under its final key in one PUT; a temporary key and a copy
would double the traffic and add no guarantee. On S3 the PUT carries Content-MD5, so a body damaged
in transit is refused by the server. The write order is the store's (image, then its database row):
an object whose row never committed is an orphan, never a row without its image.

Reads are checked: the catalog keeps every image's sha256, and `read_checked` answers only bytes that
match it (verify reads every file and compares the same way).

fsspec and s3fs are the optional `objects` extra: a store in a folder never imports them.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import os
import time
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

from index.errors import StoreInputError, StoreUnavailable
from index.failures import NOTHING_LOST, os_failure
from index.sharing import make_folders

PROTOCOLS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs"}  # object stores whose PUT is atomic, and the package fsspec needs for each
EXTRA = "pip install 'resynth[objects]'"
# what a backend says when the credentials are missing or wrong: no wait makes those answer
_CREDENTIAL_MARKS = ("Credentials", "credentials", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                     "Forbidden", "403", "Unauthorized", "401")
_CREDENTIAL_VARIABLES = {"s3fs": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
                         "gcsfs": "GOOGLE_APPLICATION_CREDENTIALS", "adlfs": "AZURE_STORAGE_CONNECTION_STRING"}


class ImageFiles(Protocol):
    """What the store asks of the place its image files live. `stored` is a row's path: relative to the
    store (a generated image, kept here) or absolute (an ingested file, read where it lies)."""

    label: str

    def write(self, relative: str, data: bytes) -> str: ...

    def check_writable(self, relatives: list[str]) -> None: ...

    def read(self, stored: str) -> bytes | None: ...

    def own(self, stored: str) -> Any: ...

    def remove(self, owned: set) -> None: ...

    def orphans(self, referenced: set) -> tuple[list, list]: ...

    def name(self, owned: Any) -> str: ...

    def delete(self, owned: list) -> None: ...

    def locator(self, stored: str) -> str: ...


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_checked(files: ImageFiles, stored: str, file_hash: str) -> bytes | None:
    """The bytes of one stored image if they are there and match the sha256 the catalog recorded."""
    data = files.read(stored)
    return data if data is not None and sha256_bytes(data) == file_hash else None


def read_local(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def check_relative(relative: str) -> PurePosixPath:
    """A generated image's place inside the store: relative, below a folder, never climbing out."""
    path = PurePosixPath(relative)
    if path.is_absolute() or len(path.parts) < 2 or ".." in path.parts:
        raise StoreInputError(f"image path {relative!r} must be relative to the store, below a folder")
    return path


class LocalImages:
    """Image files in the store folder (the default): each written atomically beside its target."""

    def __init__(self, layout):
        self.layout = layout
        self.label = str(layout.root)

    def write(self, relative: str, data: bytes) -> str:
        from index.layout import atomic_write

        path = self.layout.root / check_relative(relative)
        try:
            make_folders(path.parent, self.layout.root)  # each shared as made, in a team's store
        except OSError as exc:
            problem = os_failure(exc, path, "creating an image folder", self.layout.root)
            if problem is None:
                raise
            raise problem from exc
        def write(handle: IO[bytes]) -> None:
            handle.write(data)
        atomic_write(path, write, "image:before-replace")
        return sha256_bytes(data)

    def check_writable(self, relatives: list[str]) -> None:
        """Refuse now, in the words write() would use, when this user may not write files at `relatives` (a
        folder another user made, say): before work is spent on them (a generation, an image bought)."""
        root = self.layout.root
        for folder in sorted({(root / check_relative(r)).parent for r in relatives}):
            existing = folder
            while not existing.is_dir() and existing != root and root in existing.parents:
                existing = existing.parent
            if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
                denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(existing))
                raise os_failure(denied, existing, "writing an image", root) or denied

    def read(self, stored: str) -> bytes | None:
        return read_local(self.layout.file_path(stored))

    def own(self, stored: str) -> Path | None:
        return self.layout.own_file(stored)

    def remove(self, owned: set) -> None:
        self.layout.remove_files(owned)

    def orphans(self, referenced: set) -> tuple[list, list]:
        return self.layout.orphans(referenced)

    def name(self, owned: Path) -> str:
        return str(owned.relative_to(self.layout.root.resolve()))

    def delete(self, owned: list) -> None:
        from index.layout import unlink_quietly

        for path in owned:
            unlink_quietly(path)  # one the machine keeps is still an orphan: the report after the repair says so

    def locator(self, stored: str) -> str:
        return str(self.layout.file_path(stored))


def parse_images_url(url: str) -> str:
    """The URL as store.json keeps it (no trailing slash); a one-line StoreInputError if it is not an
    object-store URL without credentials, or if the package its backend needs is not installed."""
    if not isinstance(url, str):
        raise StoreInputError(f"--images {url!r}: not an object-store URL (s3://BUCKET/PREFIX)")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in PROTOCOLS:
        known = ", ".join(f"{p}://" for p in PROTOCOLS)
        raise StoreInputError(f"--images {url!r}: not an object-store URL (one of {known}); a local folder "
                              "needs no flag: images then live in the store folder")
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise StoreInputError(f"--images: the URL may not carry credentials or options ({scheme}://BUCKET/PREFIX); "
                              "give them through the environment (e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL)")
    if not parts.netloc:
        raise StoreInputError(f"--images {url!r}: name a bucket ({scheme}://BUCKET/PREFIX)")
    _filesystem_class(scheme)
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _filesystem_class(scheme: str):
    try:
        import fsspec

        return fsspec.get_filesystem_class(scheme)
    except ImportError:
        raise StoreInputError(f"image files at {scheme}:// need fsspec and {PROTOCOLS[scheme]}: {EXTRA}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class ObjectImages:
    """Image files under one prefix of a bucket. Generated images are kept at PREFIX/<relative path>."""

    def __init__(self, url: str):
        self.url = parse_images_url(url)
        self.label = self.url
        self.scheme, _, rest = self.url.partition("://")
        self.base = rest  # bucket/prefix, as fsspec names paths
        self._fs = None

    @property
    def fs(self):
        if self._fs is None:
            # one client per process and URL (fsspec caches instances); the environment supplies the
            # endpoint and credentials at the first use
            self._fs = _filesystem_class(self.scheme)()
        return self._fs

    def key(self, relative: str) -> str:
        return f"{self.base}/{check_relative(relative)}"

    def unavailable(self, exc: BaseException, doing: str) -> StoreUnavailable:
        said = _first_line(exc)
        if isinstance(exc, PermissionError) or any(m in f"{type(exc).__name__} {said}" for m in _CREDENTIAL_MARKS):
            where = _CREDENTIAL_VARIABLES.get(PROTOCOLS.get(self.scheme, ""), "the storage's credentials")
            return StoreUnavailable(f"image storage {self.url} refused or found no credentials {doing} ({said}): "
                                    f"{NOTHING_LOST}; set {where} for this process (waiting will not help)")
        return StoreUnavailable(f"image storage {self.url} failed {doing} ({said}): {NOTHING_LOST}; "
                                "the same command succeeds once it answers")

    def check(self) -> None:
        """That the bucket answers and takes a write (at `init`): a wrong endpoint, bucket or key is one line
        now rather than at the first generated image."""
        bucket = self.base.split("/")[0]
        probe = f"{self.base}/.resynth-probe-{os.getpid()}"
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            raise StoreInputError(f"--images {self.url}: bucket {bucket!r} does not exist, or these credentials "
                                  "cannot see it: create it first") from None
        except Exception as exc:  # noqa: BLE001 - every backend failure (network, refusal) is one line
            raise self.unavailable(exc, "finding its bucket") from None
        try:
            self.fs.pipe_file(probe, b"resynth")
            self.fs.rm_file(probe)
        except Exception as exc:  # noqa: BLE001 - every backend failure (network, refusal, no bucket) is one line
            raise self.unavailable(exc, "a test write") from None

    def check_writable(self, relatives: list[str]) -> None:
        """Nothing to check per file: the bucket's test write at open stands for every key."""

    def write(self, relative: str, data: bytes) -> str:
        key = self.key(relative)
        extra = {}
        if self.scheme in ("s3", "s3a"):  # the server refuses a body that does not match
            extra["ContentMD5"] = base64.b64encode(hashlib.md5(data).digest()).decode()
        try:
            self.fs.pipe_file(key, data, **extra)
        except Exception as exc:  # noqa: BLE001 - as in check
            raise self.unavailable(exc, f"writing {relative}") from None
        return sha256_bytes(data)

    def read(self, stored: str) -> bytes | None:
        if Path(stored).is_absolute():  # an ingested file, referenced where it lies
            return read_local(Path(stored))
        try:
            return self.fs.cat_file(self.key(stored))
        except FileNotFoundError:
            return None
        except StoreInputError:
            return None
        except Exception as exc:  # noqa: BLE001 - as in check
            raise self.unavailable(exc, f"reading {stored}") from None

    def own(self, stored: str) -> str | None:
        try:
            return self.key(stored)
        except StoreInputError:
            return None

    def orphans(self, referenced: set) -> tuple[list, list]:
        """Objects under PREFIX/images/ that no row names: (old enough to remove, too recent to judge: a
        PUT whose row is being committed). An object of unknown age counts as recent."""
        from index.layout import ORPHAN_GRACE_S

        try:
            self.fs.invalidate_cache()
            listed = self.fs.find(f"{self.base}/images", detail=True)
        except FileNotFoundError:
            return [], []
        except Exception as exc:  # noqa: BLE001 - as in check
            raise self.unavailable(exc, "listing its images") from None
        old: list[str] = []
        recent: list[str] = []
        for key, entry in sorted(listed.items()):
            if entry.get("type") != "file" or key.endswith("/") or key in referenced:
                continue  # (SeaweedFS lists a folder as a key of its own)
            age = _age_s(entry)
            (old if age is not None and age >= ORPHAN_GRACE_S else recent).append(key)
        return old, recent

    def name(self, owned: str) -> str:
        return owned[len(self.base) + 1:]

    def delete(self, owned: list) -> None:
        """Orphans `verify --repair` removes: that is the command's work, so a failure is its one line."""
        self._remove(set(owned))

    def locator(self, stored: str) -> str:
        return stored if Path(stored).is_absolute() else f"{self.scheme}://{self.key(stored)}"

    def remove(self, owned: set) -> None:
        """Objects whose rows a commit just dropped (`source remove`): the command's work is done, so an
        object store that does not answer leaves them as orphans (verify reports them, repair removes
        them) rather than failing a command that cannot be run again (its source is gone)."""
        try:
            self._remove(owned)
        except StoreUnavailable:
            pass

    def _remove(self, owned: set) -> None:
        if not owned:
            return
        try:
            self.fs.rm(sorted(owned))
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - as in check
            raise self.unavailable(exc, f"removing {len(owned)} images") from None


def _age_s(entry: dict) -> float | None:
    modified = entry.get("LastModified") or entry.get("mtime") or entry.get("last_modified")
    if modified is None:
        return None
    stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
    return time.time() - stamp


def read_location(location: str) -> bytes:
    """The bytes at a `locator` (a file path, or an object's URL: what a worker on another machine can
    read, e.g. for `reembed --ray`). FileNotFoundError when it is gone; StoreUnavailable when the object
    store does not answer."""
    scheme, found, rest = location.partition("://")
    if not found:
        return Path(location).read_bytes()
    images = ObjectImages(f"{scheme}://{rest.split('/')[0]}")
    try:
        return images.fs.cat_file(rest)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - as in ObjectImages.check
        raise images.unavailable(exc, f"reading {rest}") from None


def image_files(layout) -> ImageFiles:
    """The place `layout`'s config names for its image files. A store.json whose entry is not a usable
    URL (edited by hand, or the backend's package missing here) is one line naming store.json."""
    url = layout.config.get("images")
    if not url:
        return LocalImages(layout)
    try:
        return ObjectImages(url)
    except StoreInputError as exc:
        reason = str(exc).split(": ", 1)[-1]
        raise StoreInputError(f"{layout.config_path} names image storage {url!r} that cannot be used ({reason}); "
                              "correct its \"images\" entry or install what it needs") from None
