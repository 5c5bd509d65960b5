"""Resumable, verified HTTP(S) downloads with the standard library.

`download(url, dest, size=..., sha256=...)` streams the body into `<dest>.part`, showing a tqdm
progress bar, and renames it to `dest` only once its size and sha256 match.

Interruptions. A transfer that breaks off (a reset connection, a stalled read, a body shorter
than announced) keeps `<dest>.part`; the next attempt, in the same call (`retries`) or in a
later run, asks for the rest with an HTTP `Range: bytes=N-` header and appends it. A server that
ignores the header answers 200 with the whole body: the part file is then truncated and the
transfer starts again from byte 0. A 206 answer for any other offset is treated the same way.

Verification failures. When the complete file has the wrong size or sha256, the bytes are moved
to `<dest>.corrupt` (replacing an older one), kept for inspection, and `ChecksumError` names the
file and both hashes. The `.part` is gone, so the next run downloads afresh instead of resuming
a file that can never verify. An existing `dest` that fails verification is moved aside the same
way.

No network. Before the first request the host (or the configured HTTP proxy) is probed with a
plain TCP connection and a short timeout (`connect_timeout`, 10 s), so a machine without network
fails within seconds with `NetworkUnavailable` rather than after a long stall.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

CHUNK = 1 << 20  # bytes per read


class DownloadError(OSError):
    """A download failed (HTTP error, interrupted transfer, unexpected size)."""


class NetworkUnavailable(DownloadError):
    """The host could not be reached at all: most likely no network."""


class ChecksumError(DownloadError):
    """A file's size or sha256 is not the expected one."""


def _hash_file(path: Path, sha, progress: bool) -> None:
    """Feed the bytes of `path` to the hash object `sha`, optionally with a progress bar."""
    path = Path(path)
    with (
        open(path, "rb") as f,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"sha256 {path.name}",
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while block := f.read(CHUNK):
            sha.update(block)
            bar.update(len(block))


def sha256_file(path: Path, progress: bool = False) -> str:
    """The sha256 (hex) of a file, read in chunks."""
    sha = hashlib.sha256()
    _hash_file(path, sha, progress)
    return sha.hexdigest()


def verify_file(
    path: Path, size: int | None = None, sha256: str | None = None, progress: bool = False
) -> None:
    """Raise `ChecksumError` unless `path` has `size` bytes and the given sha256 (each check is
    skipped when its expected value is None); `FileNotFoundError` if it does not exist."""
    path = Path(path)
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumError(f"{path}: size {actual_size:,} bytes, expected {size:,}")
    if sha256 is not None:
        actual = sha256_file(path, progress=progress)
        if actual != sha256.lower():
            raise ChecksumError(f"{path}: sha256 mismatch: expected {sha256.lower()}, got {actual}")


def check_reachable(url: str, timeout: float = 10.0) -> None:
    """Open (and close) a TCP connection to the URL's host, or to the proxy urllib would use for
    it; raise `NetworkUnavailable` with the reason if that fails within `timeout` seconds."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DownloadError(f"not an http(s) URL: {url}")
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_parts.hostname:
            host, port = proxy_parts.hostname, proxy_parts.port or 80
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        raise NetworkUnavailable(f"cannot reach {host}:{port} ({error})") from error


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """(first byte, total or None) of a `Content-Range: bytes A-B/N` header, None if absent."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if not match:
        return None
    return int(match.group(1)), None if match.group(2) == "*" else int(match.group(2))


def _set_aside(path: Path) -> Path:
    """Move a file that failed verification to `<name>.corrupt` (kept for inspection)."""
    corrupt = path.with_name(path.name.removesuffix(".part") + ".corrupt")
    path.replace(corrupt)
    return corrupt


class _Interrupted(DownloadError):
    """A transfer that broke off or must restart: worth another attempt."""


class _PartFile:
    """`<dest>.part` and the running sha256 of its bytes, carried across attempts so that a
    resumed transfer does not read the file again."""

    def __init__(self, path: Path):
        self.path = path
        self.sha = hashlib.sha256()
        self.hashed = 0  # bytes of the file covered by self.sha

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def restart(self) -> None:
        self.path.unlink(missing_ok=True)
        self.sha, self.hashed = hashlib.sha256(), 0

    def sha256(self, progress: bool) -> str:
        if self.hashed != self.size():  # a part file left by an earlier run
            self.sha = hashlib.sha256()
            _hash_file(self.path, self.sha, progress)
            self.hashed = self.size()
        return self.sha.hexdigest()


def _transfer(url: str, part: _PartFile, size: int | None, timeout: float, progress: bool) -> int:
    """One HTTP request that appends to the part file, or rewrites it when the server sends the
    whole body. Returns the total size the server announced (-1 if it did not)."""
    offset = part.size()
    if size is not None and offset >= size:
        return size  # nothing left to fetch; verification decides
    if offset:
        part.sha256(progress)  # hash the bytes already there before appending
    request = urllib.request.Request(url, headers={"User-Agent": "moe-repro-data-prep"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the part cannot be a prefix of this file
            part.restart()
            raise _Interrupted(f"server refused to resume at byte {offset:,}") from error
        if error.code >= 500:  # the server's trouble, often passing
            raise _Interrupted(f"HTTP {error.code} {error.reason}") from error
        raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from error
    except (OSError, http.client.HTTPException) as error:
        raise _Interrupted(f"request failed: {error}") from error
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if response.status == 206:
            content_range = _content_range(response.headers.get("Content-Range"))
            if content_range is None or content_range[0] != offset:
                part.restart()
                raise _Interrupted("unexpected Content-Range for a resumed transfer")
            total, mode = content_range[1], "ab"
        else:  # 200: the whole body, whatever was asked for
            if offset:
                print(
                    f"{part.path.name}: the server ignored the range request;"
                    " starting again from byte 0",
                    file=sys.stderr,
                )
            part.restart()
            offset, total, mode = 0, length, "wb"
        if size is not None and total is not None and total != size:
            raise DownloadError(f"{url}: the server offers {total:,} bytes, expected {size:,}")
        total = size if total is None else total
        received = 0
        with (
            open(part.path, mode) as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.path.name.removesuffix(".part"),
                disable=not progress,
            ) as bar,
        ):
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as error:
                    raise _Interrupted(
                        f"transfer interrupted after {offset + received:,} bytes ({error})"
                    ) from error
                if not block:
                    break
                f.write(block)
                part.sha.update(block)
                part.hashed += len(block)
                received += len(block)
                bar.update(len(block))
        if total is not None and offset + received < total:
            raise _Interrupted(
                f"transfer interrupted after {offset + received:,} of {total:,} bytes"
            )
        return -1 if total is None else total


def download(
    url: str,
    dest: Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    retries: int = 5,
    retry_wait: float = 2.0,
    connect_timeout: float = 10.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download `url` to `dest` (resuming `<dest>.part`), verify it, and return `dest`.

    An existing `dest` is verified and kept. Raises `NetworkUnavailable` when the host cannot
    be reached, `ChecksumError` when the result does not verify (bytes kept in
    `<dest>.corrupt`), and `DownloadError` on an HTTP error or when the transfer still breaks
    off after `retries` resumed attempts (bytes kept in `<dest>.part` for the next run)."""
    dest = Path(dest)
    if dest.exists():
        try:
            verify_file(dest, size, sha256, progress=progress)
        except ChecksumError as error:
            corrupt = _set_aside(dest)
            raise ChecksumError(f"{error}; moved to {corrupt}") from error
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _PartFile(dest.with_name(dest.name + ".part"))
    if size is None or part.size() < size:
        check_reachable(url, connect_timeout)
    for attempt in range(retries + 1):
        try:
            total = _transfer(url, part, size, timeout, progress)
            break
        except _Interrupted as error:
            if attempt == retries:
                kept = f"; {part.path} kept, run again to resume" if part.size() else ""
                raise DownloadError(f"{url}: {error}{kept}") from error
            wait = retry_wait * 2**attempt
            print(f"{dest.name}: {error}; retrying in {wait:g} s", file=sys.stderr)
            time.sleep(wait)
    actual_size = part.size()
    expected_size = size if size is not None else (None if total < 0 else total)
    problem = None
    if expected_size is not None and actual_size != expected_size:
        problem = f"size {actual_size:,} bytes, expected {expected_size:,}"
    elif sha256 is not None and (actual := part.sha256(progress)) != sha256.lower():
        problem = f"sha256 mismatch: expected {sha256.lower()}, got {actual}"
    if problem:
        corrupt = _set_aside(part.path)
        raise ChecksumError(
            f"{dest.name}: {problem}; the downloaded bytes are kept in {corrupt} for inspection"
            " and the next run downloads afresh"
        )
    part.path.replace(dest)
    return dest
