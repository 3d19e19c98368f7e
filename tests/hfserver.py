"""A small, faithful loopback stand-in of the Hugging Face Hub HTTP API, for tests.

It is driven by the real client: ``HfApi(endpoint=server.url, token=...)`` in-process, or
``HF_ENDPOINT=server.url`` in a fresh process (huggingface_hub reads ``HF_ENDPOINT``, like
``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_XET``, once, when it is first imported: set them in the
child's environment, see :meth:`HubServer.client_env`). The requests and answers follow the calls
of the public ``huggingface_hub`` library, version 2.4.0 (``hf_api.py``, ``_commit_api.py``,
``lfs.py``, ``utils/_http.py``), and what huggingface.co answers to them.

Implemented (``{type}s`` is ``models``, ``datasets`` or ``spaces``; git URLs of datasets and
spaces carry a ``datasets/`` or ``spaces/`` prefix, models none):

* ``GET  /api/whoami-v2`` -- ``HfApi.whoami``: the user, their organisations and the token's role
  under ``["auth"]["accessToken"]["role"]`` (``"write"`` or ``"read"``), as the Hub answers.
* ``POST /api/repos/create`` -- ``HfApi.create_repo``: a new repo holds one commit with the Hub's
  default ``.gitattributes`` (the LFS patterns of a new model repo). 409 when it exists.
* ``DELETE /api/repos/delete`` -- ``HfApi.delete_repo``.
* ``GET  /api/{type}s/{ns}/{name}`` (and ``.../revision/{rev}``) -- ``repo_info``/``model_info``.
* ``POST /api/validate-yaml`` -- the model card check ``create_commit``/``upload_folder`` make for a
  ``README.md``: 400 with ``errors`` for front matter that is not a YAML mapping, a warning for a
  card without metadata (as the Hub does).
* ``POST /api/{type}s/{ns}/{name}/preupload/{rev}`` -- the upload mode of each file. As the Hub
  decides: ``lfs`` when the path matches an LFS pattern of the repo's ``.gitattributes``, when the
  file is 10 MiB or more, or when its 512-byte sample is binary (holds a NUL byte); ``regular``
  otherwise. ``oid`` of files already there (sha256 for LFS files, the git blob sha1 otherwise) and
  ``shouldIgnore`` from a ``.gitignore`` (simple patterns only).
* ``POST /{prefix}{ns}/{name}.git/info/lfs/objects/batch`` -- the git-lfs batch API (``basic``
  transfer): an ``upload`` action per object not stored yet, pointing at a one-time URL of this
  server (the Hub hands out presigned storage URLs, which get no ``Authorization`` header), and a
  ``verify`` action.
* ``PUT  /__storage/{ticket}`` -- that upload URL: the body must hash to the announced oid and size.
* ``POST /{prefix}{ns}/{name}.git/info/lfs/objects/verify`` -- the object is there, with its size.
* ``POST /api/{type}s/{ns}/{name}/commit/{rev}`` -- the ndjson commit: ``header``, ``file``
  (base64), ``lfsFile`` (its content must have come through LFS or Xet), ``deletedFile``,
  ``deletedFolder``. Like the Hub it refuses regular files that are binary or 10 MiB or more
  (400), an unknown LFS oid (400), a stale ``parentCommit`` (412); ``create_pr`` is not
  implemented (400).

Xet storage: huggingface_hub 2.4.0 sends the files the Hub marks ``lfs`` through Xet whenever the
``hf_xet`` package is installed (a dependency of huggingface_hub on x86-64 and arm64), and
``upload_folder`` then runs its Xet pipeline; only with ``HF_HUB_DISABLE_XET=1`` does it use the
git-lfs calls above. Both paths are served. For Xet, as the CAS API of the public xet-core project
specifies:

* ``GET  /api/{type}s/{ns}/{name}/xet-write-token/{rev}`` (and ``xet-read-token``) -- a short-lived
  CAS token, ``{"accessToken", "exp", "casUrl"}``; ``casUrl`` is ``{url}/__xet/{instance}`` on this
  server (unique per instance, since hf_xet keeps a local shard cache per CAS URL).
* ``POST {casUrl}/v1/xorbs/default/{hash}`` -- a xorb (chunks, each ``None``, ``LZ4`` or
  ``ByteGrouping4LZ4``); ``HEAD`` of the same says whether it is stored.
* ``POST {casUrl}/v2/shards`` (NDJSON progress frames) and ``POST {casUrl}/v1/shards`` -- a shard:
  its file entries are rebuilt from the stored xorbs' chunks and kept under their sha256, which the
  commit's ``lfsFile`` lines then name.
* ``GET {casUrl}/v1/chunks/default-merkledb/{hash}`` -- global deduplication: always 404 (none).
* ``POST {casUrl}/v1/telemetry`` -- accepted and dropped.

Xorb and chunk hashes are not recomputed (that needs BLAKE3, not in the standard library): a
xorb is trusted to be what its name says, but every file a shard describes is rebuilt and hashed.

Authentication and errors, as the Hub answers them (JSON body ``{"error": ...}`` plus the
``X-Error-Message`` header, ``X-Error-Code`` where the Hub sets one; huggingface_hub turns them into
readable exceptions):

* a token that is not known: 401 "Invalid credentials in Authorization header", on every endpoint;
* a repo that does not exist, or a private repo the caller may not see: ``X-Error-Code:
  RepoNotFound`` (``RepositoryNotFoundError``), 404 with a token, 401 without one (the Hub hides
  what it has from anonymous callers the same way);
* writing (create a repo, preupload, LFS batch, Xet write token, commit) without a token: 401; with
  a read token, or in a namespace that is neither the user nor one of their organisations: 403;
* ``HubServer.refuse_uploads = True``: whoami, repo info and repo creation still work, but uploads
  are refused from ``refusal_point`` on: ``"preupload"`` (the default: the first call of every
  upload), ``"storage"`` (the LFS batch call and storage PUT, the Xet write token and CAS uploads) or
  ``"commit"`` (the files are stored, the commit is refused). The answer is ``refusal_status`` (403)
  with ``refusal_message``; a 5xx would make the client retry for about 20 seconds. So a test can
  let an upload fail after the credentials were checked. Note how the client reports it: refusals of
  the Hub's own calls raise ``HfHubHTTPError``, but hf_xet reports an HTTP error of the Xet token or
  CAS calls (``"storage"`` under Xet) as a builtin ``ConnectionError`` naming the status.

Downloads: ``/resolve/`` (``hf_hub_download``) over plain HTTP, with the Hub's access rules. Not
implemented: Xet reconstructions, file listings (``/tree/``: ``snapshot_download``,
``list_repo_files``, ``upload_folder`` with ``delete_patterns``), branches, tags and pull requests (only ``main``), multipart LFS uploads, and
Spaces' runtime.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import re
import secrets
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# The Hub stores files of 10 MiB or more with LFS, and refuses them as git blobs.
LFS_THRESHOLD = 10 * 1024 * 1024
SAMPLE_SIZE = 512  # the preupload call sends the first 512 bytes of each file
DEFAULT_BRANCH = "main"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
GIT_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
UPLOAD_STAGES = ("preupload", "storage", "commit")  # where HubServer.refusal_point can make uploads fail

# The .gitattributes the Hub puts in the first commit of a new model repo.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z",
        "*.arrow",
        "*.bin",
        "*.bz2",
        "*.ckpt",
        "*.ftz",
        "*.gz",
        "*.h5",
        "*.joblib",
        "*.lfs.*",
        "*.mlmodel",
        "*.model",
        "*.msgpack",
        "*.npy",
        "*.npz",
        "*.onnx",
        "*.ot",
        "*.parquet",
        "*.pb",
        "*.pickle",
        "*.pkl",
        "*.pt",
        "*.pth",
        "*.rar",
        "*.safetensors",
        "saved_model/**/*",
        "*.tar.*",
        "*.tar",
        "*.tflite",
        "*.tgz",
        "*.wasm",
        "*.xz",
        "*.zip",
        "*.zst",
        "*tfevents*",
    )
)


class HubError(Exception):
    """An HTTP error answer: status, message, and the ``X-Error-Code`` the Hub would set (if any)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass
class Account:
    """What a token stands for: a user, the token's role ("write" or "read") and the user's organisations."""

    token: str
    user: str
    role: str
    orgs: list[str]
    display_name: str

    def owns(self, namespace: str) -> bool:
        return namespace == self.user or namespace in self.orgs


@dataclass
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """What the preupload call reports: sha256 for LFS files, the git blob sha1 for the others."""
        return hashlib.sha256(self.content).hexdigest() if self.lfs else git_blob_sha1(self.content)


@dataclass
class Commit:
    oid: str
    summary: str
    description: str
    author: str
    parent: str | None
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    files: dict[str, StoredFile] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 hex -> content

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]

    @property
    def head(self) -> str:
        return self.commits[-1].oid


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server answered: method, path (no query string), status, and the token's user."""

    method: str
    path: str
    status: int
    user: str | None


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(content: bytes) -> bytes:
    """The git-lfs pointer file git stores for an LFS file (its git blob is what ``blobId`` names)."""
    digest = hashlib.sha256(content).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\nsize {len(content)}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _is_binary(sample: bytes) -> bool:
    return b"\0" in sample


def _lfs_patterns(gitattributes: bytes | None) -> list[str]:
    patterns = []
    for line in (gitattributes or b"").decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def _matches(pattern: str, path: str) -> bool:
    """A gitattributes/gitignore pattern: without a slash it matches the file name at any depth,
    with one it matches the path from the repo root (``**`` spanning folders)."""
    pattern = pattern.rstrip("/")
    if "/" not in pattern:
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern) or any(
            fnmatch.fnmatchcase(part, pattern) for part in path.split("/")[:-1]
        )
    pattern = pattern.lstrip("/")
    regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
    regex = regex.replace(r"\?", "[^/]")
    return re.fullmatch(regex, path) is not None or re.match(regex + "/", path) is not None


def _gitignored(gitignore: str | None, path: str) -> bool:
    ignored = False
    for line in (gitignore or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if _matches(line[1:] if negate else line, path):
            ignored = not negate
    return ignored


# ---------------------------------------------------------------------- Xet formats
# Shards and xorbs as xet-core writes them (shard format version 2, xorb chunk format version 0).

SHARD_HEADER_TAG = b"HFRepoMetaData\x00" + bytes(
    [85, 105, 103, 69, 106, 123, 129, 87, 131, 165, 189, 217, 92, 205, 209, 74, 169]
)
SHARD_ENTRY_SIZE = 48  # every file-info and xorb-info entry is 48 bytes
FILE_FLAG_WITH_VERIFICATION = 1 << 31
FILE_FLAG_WITH_METADATA_EXT = 1 << 30
XORB_CHUNK_HEADER_SIZE = 8
LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"


class XetFormatError(ValueError):
    """A shard or xorb that does not parse."""


def xet_hash_hex(raw: bytes) -> str:
    """A 32-byte Xet hash (four little-endian u64) in the hex form of URLs: each u64 as 16 hex digits."""
    return "".join(f"{value:016x}" for value in struct.unpack("<4Q", raw))


def parse_shard_files(data: bytes) -> list[list[tuple[str, int, int, int]]]:
    """The file-info section of an uploaded shard (sent without footer): for each file, its
    segments as (xorb hash hex, unpacked bytes, first chunk index, end chunk index)."""
    if data[:32] != SHARD_HEADER_TAG or len(data) < 48:
        raise XetFormatError("not a Xet shard (wrong magic number)")
    version = struct.unpack_from("<Q", data, 32)[0]
    if version != 2:
        raise XetFormatError(f"unsupported shard version {version}")
    pos, files = 48, []

    def entry(at: int) -> bytes:
        if at + SHARD_ENTRY_SIZE > len(data):
            raise XetFormatError("truncated shard")
        return data[at : at + SHARD_ENTRY_SIZE]

    while True:
        header = entry(pos)
        pos += SHARD_ENTRY_SIZE
        if header[:32] == b"\xff" * 32:  # the bookend closing the file-info section
            return files
        flags, n_entries = struct.unpack_from("<II", header, 32)
        segments = []
        for _ in range(n_entries):
            segment = entry(pos)
            pos += SHARD_ENTRY_SIZE
            _, unpacked, start, end = struct.unpack_from("<IIII", segment, 32)
            segments.append((xet_hash_hex(segment[:32]), unpacked, start, end))
        if flags & FILE_FLAG_WITH_VERIFICATION:
            pos += SHARD_ENTRY_SIZE * n_entries
        if flags & FILE_FLAG_WITH_METADATA_EXT:
            pos += SHARD_ENTRY_SIZE
        files.append(segments)


def parse_xorb_chunks(data: bytes) -> list[bytes]:
    """The chunks of a serialized xorb, decompressed (the footer after them is skipped)."""
    chunks, pos = [], 0
    while (
        pos + XORB_CHUNK_HEADER_SIZE <= len(data) and data[pos] == 0
    ):  # version 0; the footer starts "XETBLOB"
        compressed_length = int.from_bytes(data[pos + 1 : pos + 4], "little")
        scheme = data[pos + 4]
        length = int.from_bytes(data[pos + 5 : pos + 8], "little")
        body = data[pos + XORB_CHUNK_HEADER_SIZE : pos + XORB_CHUNK_HEADER_SIZE + compressed_length]
        pos += XORB_CHUNK_HEADER_SIZE + compressed_length
        if len(body) != compressed_length:
            raise XetFormatError("truncated xorb chunk")
        if scheme == 0:
            chunk = body
        elif scheme == 1:
            chunk = lz4_frame_decompress(body)
        elif scheme == 2:
            chunk = bg4_regroup(lz4_frame_decompress(body))
        else:
            raise XetFormatError(f"unknown chunk compression scheme {scheme}")
        if len(chunk) != length:
            raise XetFormatError(f"chunk decompressed to {len(chunk)} bytes, its header says {length}")
        chunks.append(chunk)
    if not chunks:
        raise XetFormatError("a xorb without chunks")
    return chunks


def bg4_regroup(grouped: bytes) -> bytes:
    """Undo xet's 4-byte grouping: the bytes at positions 0, 1, 2, 3 (mod 4) were stored one group after the other."""
    n = len(grouped)
    sizes = [len(range(k, n, 4)) for k in range(4)]
    out = bytearray(n)
    offset = 0
    for k, size in enumerate(sizes):
        out[k::4] = grouped[offset : offset + size]
        offset += size
    return bytes(out)


def lz4_frame_decompress(data: bytes) -> bytes:
    """Decode an LZ4 frame (the format of lz4_flex's FrameEncoder, which xet uses)."""
    if data[:4] != LZ4_FRAME_MAGIC or len(data) < 7:
        raise XetFormatError("not an LZ4 frame")
    flags = data[4]
    pos = 6 + (8 if flags & 0x08 else 0) + (4 if flags & 0x01 else 0) + 1  # FLG BD [size] [dict id] HC
    out = bytearray()
    while True:
        if pos + 4 > len(data):
            raise XetFormatError("truncated LZ4 frame")
        size = int.from_bytes(data[pos : pos + 4], "little")
        pos += 4
        if size == 0:  # end mark (a content checksum may follow)
            return bytes(out)
        length = size & 0x7FFFFFFF
        if size & 0x80000000:
            out += data[pos : pos + length]
        else:
            _lz4_block(data, pos, pos + length, out)
        pos += length + (4 if flags & 0x10 else 0)


def _lz4_block(src: bytes, pos: int, end: int, out: bytearray) -> None:
    """Decode one LZ4 block into ``out`` (matches may reach back into earlier blocks: linked blocks)."""
    while pos < end:
        token = src[pos]
        pos += 1
        literals = token >> 4
        if literals == 15:
            while True:
                extra = src[pos]
                pos += 1
                literals += extra
                if extra != 255:
                    break
        out += src[pos : pos + literals]
        pos += literals
        if pos >= end:  # the last sequence has literals only
            return
        offset = src[pos] | (src[pos + 1] << 8)
        pos += 2
        match = token & 15
        if match == 15:
            while True:
                extra = src[pos]
                pos += 1
                match += extra
                if extra != 255:
                    break
        match += 4
        start = len(out) - offset
        if offset == 0 or start < 0:
            raise XetFormatError("LZ4 match offset out of range")
        if match <= offset:
            out += out[start : start + match]
        else:  # the match overlaps what it writes: the last `offset` bytes repeat
            pattern = bytes(out[start:])
            out += (pattern * (match // offset + 1))[:match]


class HubServer:
    """The stand-in: a ``ThreadingHTTPServer`` on 127.0.0.1 (a free port) in a background thread.

    ``with HubServer() as hub: ...`` starts and stops it (or :meth:`start` / :meth:`stop`, or the
    module's :func:`start`). Set-up: :meth:`add_token`, :meth:`add_repo`. Assertions:
    :meth:`repo_exists`, :meth:`is_private`, :meth:`files`, :meth:`lfs_files`, :meth:`commits`,
    :attr:`requests`, :attr:`log`.

    Attributes:
        url: the Hub endpoint, ``http://127.0.0.1:<port>`` (``HfApi(endpoint=...)``, ``HF_ENDPOINT``).
        cas_url: the Xet CAS endpoint the Xet tokens name (on the same server).
        refuse_uploads: when true, uploads are refused from ``refusal_point`` on ("preupload" by
            default, "storage" or "commit"), with ``refusal_status`` (403) and ``refusal_message``;
            whoami, repo info and repo creation keep working.
        log: every request answered, as :class:`RecordedRequest` (method, path, status, user).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.RLock()
        self._accounts: dict[str, Account] = {}
        self._repos: dict[tuple[str, str], Repo] = {}
        # storage upload ticket -> (repo key, oid, size)
        self._tickets: dict[str, tuple[tuple[str, str], str, int]] = {}
        self._counter = itertools.count(1)
        # xorb hash (hex) -> its decompressed chunks; the CAS is one store for all repos
        self._xorbs: dict[str, list[bytes]] = {}
        # CAS access token -> (repo key, "read" or "write", expiry)
        self._xet_tokens: dict[str, tuple[tuple[str, str], str, float]] = {}
        self._instance = secrets.token_hex(6)
        self._connections: set[socket.socket] = set()
        self.refuse_uploads = False
        self.refusal_point = "preupload"
        self.refusal_status = 403
        self.refusal_message = "Uploads are refused by this Hub (the test switched refuse_uploads on)"
        self.log: list[RecordedRequest] = []
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        self.cas_url = f"{self.url}/__xet/{self._instance}"
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> HubServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, args=(0.05,), name="hub-stand-in", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop the clients' kept-alive connections (a stopped Hub answers nothing)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ set-up and assertions

    def add_token(
        self,
        token: str,
        *,
        user: str,
        role: str = "write",
        orgs: list[str] | tuple[str, ...] = (),
        display_name: str | None = None,
    ) -> None:
        """Make ``token`` valid: it authenticates ``user``, member of ``orgs``, with ``role`` "write" or "read"."""
        if role not in ("write", "read"):
            raise ValueError(f"role must be 'write' or 'read', not {role!r}")
        with self._lock:
            self._accounts[token] = Account(token, user, role, list(orgs), display_name or f"{user}-{role}")

    def add_repo(
        self,
        repo_id: str,
        *,
        private: bool = False,
        files: dict[str, bytes] | None = None,
        repo_type: str = "model",
    ) -> None:
        """Create a repo directly (e.g. someone else's), with the default ``.gitattributes`` plus ``files``."""
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise ValueError(f"{repo_type} repo {repo_id} exists already")
            repo = self._create(repo_type, repo_id, private, author=repo_id.split("/", 1)[0])
            if files:
                for path, content in files.items():
                    lfs = self._upload_mode(repo, path, len(content), content[:SAMPLE_SIZE]) == "lfs"
                    repo.files[path] = StoredFile(content, lfs)
                    if lfs:
                        repo.lfs_objects[hashlib.sha256(content).hexdigest()] = content
                self._commit(repo, "Add files", "", repo.namespace)

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        return self._get_repo(repo_id, repo_type).private

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        """The files on the repo's ``main`` branch, path -> content (``.gitattributes`` included)."""
        with self._lock:
            return {path: f.content for path, f in self._get_repo(repo_id, repo_type).files.items()}

    def lfs_files(self, repo_id: str, repo_type: str = "model") -> set[str]:
        """The paths on ``main`` stored as LFS objects."""
        with self._lock:
            return {path for path, f in self._get_repo(repo_id, repo_type).files.items() if f.lfs}

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        """The repo's commits, oldest first (the first is the Hub's "initial commit")."""
        with self._lock:
            return list(self._get_repo(repo_id, repo_type).commits)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """The requests received so far, as (method, path) pairs (no query string)."""
        with self._lock:
            return [(r.method, r.path) for r in self.log]

    def client_env(self, *, xet: bool = True) -> dict[str, str]:
        """Environment for a fresh process whose huggingface_hub should talk to this server.

        ``HF_ENDPOINT`` points at it and ``HF_HUB_OFFLINE`` is off (the test suite turns it on);
        ``xet=False`` adds ``HF_HUB_DISABLE_XET=1`` (uploads through git-lfs instead of Xet).
        Merge it into the child's environment: huggingface_hub reads these when it is imported."""
        env = {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0"}
        if not xet:
            env["HF_HUB_DISABLE_XET"] = "1"
        return env

    def _get_repo(self, repo_id: str, repo_type: str) -> Repo:
        with self._lock:
            try:
                return self._repos[(repo_type, repo_id)]
            except KeyError:
                raise KeyError(f"no {repo_type} repo {repo_id} on the test Hub") from None

    # ------------------------------------------------------------------ model

    def _create(self, repo_type: str, repo_id: str, private: bool, author: str) -> Repo:
        repo = Repo(repo_type, repo_id, private, _now())
        repo.files[".gitattributes"] = StoredFile(DEFAULT_GITATTRIBUTES.encode(), lfs=False)
        self._repos[(repo_type, repo_id)] = repo
        self._commit(repo, "initial commit", "", author)
        return repo

    def _commit(self, repo: Repo, summary: str, description: str, author: str) -> Commit:
        parent = repo.commits[-1].oid if repo.commits else None
        seed = f"{repo.repo_type}/{repo.repo_id}|{parent}|{summary}|{next(self._counter)}|"
        seed += "|".join(f"{p}:{f.oid}" for p, f in sorted(repo.files.items()))
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), summary, description, author, parent, _now())
        repo.commits.append(commit)
        return commit

    def _upload_mode(self, repo: Repo, path: str, size: int, sample: bytes) -> str:
        attributes = repo.files.get(".gitattributes")
        patterns = _lfs_patterns(attributes.content if attributes else None)
        if any(_matches(p, path) for p in patterns) or size >= LFS_THRESHOLD or _is_binary(sample):
            return "lfs"
        return "regular"

    def _record(self, method: str, path: str, status: int, user: str | None) -> None:
        with self._lock:
            self.log.append(RecordedRequest(method, path, status, user))


# ---------------------------------------------------------------------- HTTP layer

_REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_API_REPO = r"^/api/(?P<kind>models|datasets|spaces)/" + _REPO
_GIT_REPO = r"^/(?:(?P<kind>datasets|spaces)/)?" + _REPO + r"\.git/info/lfs/objects/"
_CAS = r"^/__xet/(?P<instance>[0-9a-f]+)"
_RESOLVE = r"^/(?:(?P<kind>datasets|spaces)/)?" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<file>.+)$"

ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("DELETE", re.compile(r"^/api/repos/delete$"), "delete_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(_API_REPO + r"(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("POST", re.compile(_API_REPO + r"/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(_API_REPO + r"/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(_API_REPO + r"/xet-(?P<access>read|write)-token(?:/(?P<rev>[^/]+))?$"), "xet_token"),
    ("POST", re.compile(_GIT_REPO + r"batch$"), "lfs_batch"),
    ("POST", re.compile(_GIT_REPO + r"verify$"), "lfs_verify"),
    ("PUT", re.compile(r"^/__storage/(?P<ticket>[0-9a-f]+)$"), "storage_put"),
    ("POST", re.compile(_CAS + r"/v1/xorbs/(?P<prefix>[^/]+)/(?P<xorb>[0-9a-f]{64})$"), "cas_xorb"),
    ("HEAD", re.compile(_CAS + r"/v1/xorbs/(?P<prefix>[^/]+)/(?P<xorb>[0-9a-f]{64})$"), "cas_xorb_head"),
    ("POST", re.compile(_CAS + r"/v(?P<version>[12])/shards$"), "cas_shard"),
    ("GET", re.compile(_CAS + r"/v1/chunks/(?P<prefix>[^/]+)/(?P<chunk>[0-9a-f]{64})$"), "cas_chunk"),
    (
        "POST",
        re.compile(_CAS + r"/v1/xorb-grants/(?P<prefix>[^/]+)/(?P<xorb>[0-9a-f]{64})$"),
        "cas_xorb_grant",
    ),
    ("POST", re.compile(r"^(?:/__xet/(?P<instance>[0-9a-f]+))?/v1/telemetry$"), "cas_telemetry"),
    ("GET", re.compile(_RESOLVE), "resolve"),
    ("HEAD", re.compile(_RESOLVE), "resolve"),
]


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        server_hub = hub

    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server_hub: HubServer

    # ------------------------------------------------------------------ plumbing

    def setup(self) -> None:
        super().setup()
        with self.server_hub._lock:
            self.server_hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.server_hub._lock:
            self.server_hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass  # requests are recorded in HubServer.log instead of stderr

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        hub = self.server_hub
        split = urlsplit(self.path)
        path = unquote(split.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.account: Account | None = None
        status = 500
        try:
            self.body = self._read_body()
            # Storage URLs and the CAS (and its telemetry) carry credentials of their own.
            if not split.path.startswith(("/__", "/v1/")):
                self.account = self._authenticate()
            for route_method, pattern, name in ROUTES:
                match = pattern.match(split.path)
                if match and route_method == method:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    status = getattr(self, f"_h_{name}")(**params)
                    break
            else:
                raise HubError(404, f"{method} {path} is not implemented by the test Hub")
        except HubError as e:
            status = self._send_error(e.status, e.message, e.code)
        except Exception as e:  # noqa: BLE001 - a bug in the stand-in must still answer, and loudly
            status = self._send_error(500, f"test Hub internal error: {type(e).__name__}: {e}")
        hub._record(method, path, status, self.account.user if self.account else None)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authenticate(self) -> Account | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        with self.server_hub._lock:
            account = self.server_hub._accounts.get(token.strip()) if scheme.lower() == "bearer" else None
        if account is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return account

    def _json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from None

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> int:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", f"Root={uuid.uuid4()}")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    def _send_json(self, status: int, obj: Any, content_type: str = "application/json; charset=utf-8") -> int:
        return self._send(status, json.dumps(obj).encode(), content_type)

    def _send_error(self, status: int, message: str, code: str | None = None) -> int:
        header_text = " ".join(message.split()).encode("latin-1", "replace").decode("latin-1")
        headers = {"X-Error-Message": header_text}
        if code:
            headers["X-Error-Code"] = code
        return self._send(
            status, json.dumps({"error": message}).encode(), "application/json; charset=utf-8", headers
        )

    # ------------------------------------------------------------------ access rules

    def _repo(self, kind: str | None, ns: str, name: str) -> Repo:
        """The repo, if the caller may see it; RepoNotFound otherwise (401 anonymous, 404 with a token)."""
        repo_type = REPO_TYPES[kind] if kind in REPO_TYPES else "model"
        with self.server_hub._lock:
            repo = self.server_hub._repos.get((repo_type, f"{ns}/{name}"))
        if repo is None or (repo.private and not (self.account and self.account.owns(repo.namespace))):
            if self.account is None:
                raise HubError(401, "Invalid username or password.", "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _require_write(self, repo: Repo, what: str) -> None:
        if self.account is None:
            raise HubError(401, "You must be authenticated to access this resource")
        if not self.account.owns(repo.namespace):
            raise HubError(403, f"You don't have the rights to {what} {repo.repo_id}")
        if self.account.role != "write":
            raise HubError(
                403, f"You don't have the rights to {what} {repo.repo_id}: the token has only read access"
            )

    def _refuse_if_switched(self, stage: str) -> None:
        """Refuse this step of an upload if the test switched refusals on at ``stage`` or before it."""
        hub = self.server_hub
        if hub.refusal_point not in UPLOAD_STAGES:
            raise ValueError(f"refusal_point must be one of {UPLOAD_STAGES}, not {hub.refusal_point!r}")
        if hub.refuse_uploads and UPLOAD_STAGES.index(stage) >= UPLOAD_STAGES.index(hub.refusal_point):
            raise HubError(hub.refusal_status, hub.refusal_message)

    @staticmethod
    def _check_rev(repo: Repo, rev: str | None) -> None:
        if rev not in (None, DEFAULT_BRANCH, repo.head):
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    # ------------------------------------------------------------------ endpoints

    def _h_whoami(self) -> int:
        account = self.account
        if account is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self._send_json(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(account.user.encode()).hexdigest()[:24],
                "name": account.user,
                "fullname": account.user.title(),
                "email": f"{account.user}@example.com",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": f"{self.server_hub.url}/avatars/{account.user}.svg",
                "orgs": [
                    {
                        "type": "org",
                        "id": hashlib.sha1(org.encode()).hexdigest()[:24],
                        "name": org,
                        "fullname": org.title(),
                        "email": None,
                        "canPay": False,
                        "periodEnd": None,
                        "avatarUrl": f"{self.server_hub.url}/avatars/{org}.svg",
                        "roleInOrg": "admin",
                        "isEnterprise": False,
                    }
                    for org in account.orgs
                ],
                "auth": {
                    "type": "access_token",
                    "accessToken": {
                        "displayName": account.display_name,
                        "role": account.role,
                        "createdAt": "2024-01-01T00:00:00.000Z",
                    },
                },
            },
        )

    def _h_create_repo(self) -> int:
        hub = self.server_hub
        payload = self._json() or {}
        name = payload.get("name")
        repo_type = payload.get("type") or "model"
        if not isinstance(name, str) or not name or repo_type not in GIT_URL_PREFIXES:
            raise HubError(400, "Invalid repo name or type")
        if self.account is None:
            raise HubError(401, "You must be authenticated to access this resource")
        namespace = payload.get("organization") or self.account.user
        if not self.account.owns(namespace) or self.account.role != "write":
            reason = ": the token has only read access" if self.account.owns(namespace) else ""
            raise HubError(
                403,
                f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"{reason}',
            )
        repo_id = f"{namespace}/{name}"
        url = f"{hub.url}/{GIT_URL_PREFIXES[repo_type]}{repo_id}"
        with hub._lock:
            if (repo_type, repo_id) in hub._repos:
                return self._send_json(
                    409, {"error": f"You already created this {repo_type} repo", "url": url}
                )
            private = payload.get("visibility") == "private" or payload.get("private") is True
            hub._create(repo_type, repo_id, private, author=self.account.user)
        return self._send_json(
            200, {"url": url, "name": repo_id, "id": hashlib.sha1(url.encode()).hexdigest()[:24]}
        )

    def _h_delete_repo(self) -> int:
        payload = self._json() or {}
        kind = {"dataset": "datasets", "space": "spaces"}.get(payload.get("type") or "model", "models")
        namespace = payload.get("organization") or (self.account.user if self.account else "")
        repo = self._repo(kind, namespace, payload.get("name") or "")
        self._require_write(repo, "delete")
        with self.server_hub._lock:
            del self.server_hub._repos[(repo.repo_type, repo.repo_id)]
        return self._send(200, b"", "text/plain; charset=utf-8")

    def _h_validate_yaml(self) -> int:
        payload = self._json() or {}
        content = payload.get("content")
        if not isinstance(content, str):
            raise HubError(400, "content must be a string")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", content.replace("\r\n", "\n"), re.DOTALL)
        metadata_text = match.group(1) if match else ""
        try:
            metadata = yaml.safe_load(metadata_text) if metadata_text.strip() else None
        except yaml.YAMLError as e:
            return self._send_json(400, {"errors": [{"message": f"Invalid YAML in the metadata: {e}"}]})
        if metadata is not None and not isinstance(metadata, dict):
            return self._send_json(
                400, {"errors": [{"message": "The YAML metadata must be a mapping (key: value)"}]}
            )
        warnings = (
            [] if metadata else [{"message": "empty or missing yaml metadata in repo card", "path": ""}]
        )
        return self._send_json(200, {"errors": [], "warnings": warnings})

    def _h_repo_info(self, kind: str, ns: str, name: str, rev: str | None = None) -> int:
        repo = self._repo(kind, ns, name)
        self._check_rev(repo, rev)
        hub = self.server_hub
        with hub._lock:
            files = dict(repo.files)
            head = repo.commits[-1]
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, f in sorted(files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling["size"] = len(f.content)
                sibling["blobId"] = git_blob_sha1(lfs_pointer(f.content) if f.lfs else f.content)
                if f.lfs:
                    sibling["lfs"] = {
                        "size": len(f.content),
                        "sha256": hashlib.sha256(f.content).hexdigest(),
                        "pointerSize": len(lfs_pointer(f.content)),
                    }
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.namespace,
            "sha": head.oid,
            "lastModified": head.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(f.content) for f in files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return self._send_json(200, info)

    def _h_resolve(self, ns: str, name: str, rev: str, file: str, kind: str | None = None) -> int:
        """A file's bytes (``hf_hub_download``): served directly, where the Hub redirects LFS files to
        its CDN; no Xet headers, so the client takes the plain HTTP path."""
        repo = self._repo(kind, ns, name)
        self._check_rev(repo, rev)
        with self.server_hub._lock:
            stored = repo.files.get(file)
            head = repo.head
        if stored is None:
            raise HubError(404, f"Entry not found: {file}", "EntryNotFound")
        headers = {"X-Repo-Commit": head, "ETag": f'"{stored.oid}"'}
        return self._send(200, stored.content, "application/octet-stream", headers)

    def _h_preupload(self, kind: str, ns: str, name: str, rev: str) -> int:
        repo = self._repo(kind, ns, name)
        self._require_write(repo, "upload to")
        self._refuse_if_switched("preupload")
        self._check_rev(repo, rev)
        payload = self._json() or {}
        entries = payload.get("files")
        if not isinstance(entries, list):
            raise HubError(400, "files must be a list")
        with self.server_hub._lock:
            stored = dict(repo.files)
        gitignore = payload.get("gitIgnore")
        if gitignore is None and ".gitignore" in stored:
            gitignore = stored[".gitignore"].content.decode("utf-8", "replace")
        answers = []
        for entry in entries:
            path, size = entry.get("path"), entry.get("size")
            if not isinstance(path, str) or not isinstance(size, int):
                raise HubError(400, "each file needs a path and a size")
            sample = base64.b64decode(entry.get("sample") or "")
            answer: dict[str, Any] = {
                "path": path,
                "uploadMode": self.server_hub._upload_mode(repo, path, size, sample),
                "shouldIgnore": _gitignored(gitignore, path),
            }
            if path in stored:
                answer["oid"] = stored[path].oid
            answers.append(answer)
        return self._send_json(200, {"files": answers, "commitOid": repo.head})

    def _h_lfs_batch(self, ns: str, name: str, kind: str | None = None) -> int:
        hub = self.server_hub
        repo = self._repo(kind, ns, name)
        payload = self._json() or {}
        if payload.get("operation") != "upload":
            raise HubError(400, "only the upload operation is implemented by the test Hub")
        self._require_write(repo, "upload to")
        self._refuse_if_switched("storage")
        git_url = f"{hub.url}/{GIT_URL_PREFIXES[repo.repo_type]}{repo.repo_id}.git/info/lfs/objects"
        objects = []
        for obj in payload.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            if (
                not isinstance(oid, str)
                or not re.fullmatch(r"[0-9a-f]{64}", oid)
                or not isinstance(size, int)
            ):
                objects.append(
                    {
                        "oid": str(oid),
                        "size": size if isinstance(size, int) else 0,
                        "error": {"code": 422, "message": "Invalid oid or size"},
                    }
                )
                continue
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            with hub._lock:
                present = oid in repo.lfs_objects
                if not present:
                    ticket = secrets.token_hex(16)
                    hub._tickets[ticket] = ((repo.repo_type, repo.repo_id), oid, size)
            if not present:
                answer["actions"] = {
                    "upload": {"href": f"{hub.url}/__storage/{ticket}", "expires_in": 900},
                    "verify": {"href": f"{git_url}/verify"},  # the client sends its own Authorization
                }
            objects.append(answer)
        return self._send_json(
            200,
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            "application/vnd.git-lfs+json",
        )

    def _h_storage_put(self, ticket: str) -> int:
        hub = self.server_hub
        self._refuse_if_switched("storage")
        with hub._lock:
            entry = hub._tickets.pop(ticket, None)
        if entry is None:
            raise HubError(403, "Request has expired or the signature does not match")
        key, oid, size = entry
        if len(self.body) != size or hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(
                400, f"The uploaded content does not match the announced oid {oid} and size {size}"
            )
        with hub._lock:
            repo = hub._repos.get(key)
            if repo is not None:
                repo.lfs_objects[oid] = self.body
        return self._send(
            200, b"", "text/plain; charset=utf-8", {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'}
        )

    def _h_lfs_verify(self, ns: str, name: str, kind: str | None = None) -> int:
        repo = self._repo(kind, ns, name)
        payload = self._json() or {}
        with self.server_hub._lock:
            content = repo.lfs_objects.get(str(payload.get("oid")))
        if content is None or len(content) != payload.get("size"):
            raise HubError(404, f"LFS object {payload.get('oid')} was not uploaded")
        return self._send_json(200, {"success": True}, "application/vnd.git-lfs+json")

    def _h_xet_token(self, kind: str, ns: str, name: str, access: str, rev: str | None = None) -> int:
        hub = self.server_hub
        repo = self._repo(kind, ns, name)
        if access == "write":
            self._require_write(repo, "upload to")
            self._refuse_if_switched("storage")
        expiry = int(time.time()) + 3600
        token = secrets.token_urlsafe(24)
        with hub._lock:
            hub._xet_tokens[token] = ((repo.repo_type, repo.repo_id), access, expiry)
        body = json.dumps({"accessToken": token, "exp": expiry, "casUrl": hub.cas_url}).encode()
        headers = {
            "X-Xet-Cas-Url": hub.cas_url,
            "X-Xet-Access-Token": token,
            "X-Xet-Token-Expiration": str(expiry),
        }
        return self._send(200, body, "application/json; charset=utf-8", headers)

    # ------------------------------------------------------------------ Xet CAS

    def _cas_auth(self, instance: str, write: bool) -> tuple[str, str]:
        """The repo a CAS request's bearer token was issued for (plain-text errors, as the CAS answers)."""
        hub = self.server_hub
        if instance != hub._instance:
            raise HubError(404, "unknown CAS instance")
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        with hub._lock:
            grant = hub._xet_tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if grant is None or grant[2] < time.time():
            raise HubError(401, "Missing or expired CAS token")
        if write:
            if grant[1] != "write":
                raise HubError(403, "The CAS token does not have write scope")
            self._refuse_if_switched("storage")
        return grant[0]

    def _h_cas_xorb(self, instance: str, prefix: str, xorb: str) -> int:
        self._cas_auth(instance, write=True)
        if prefix != "default":
            raise HubError(400, f"invalid xorb prefix {prefix}")
        try:
            chunks = parse_xorb_chunks(self.body)
        except XetFormatError as e:
            raise HubError(400, f"bad xorb serialization: {e}") from None
        with self.server_hub._lock:
            inserted = xorb not in self.server_hub._xorbs
            self.server_hub._xorbs.setdefault(xorb, chunks)
        return self._send_json(200, {"was_inserted": inserted})

    def _h_cas_xorb_head(self, instance: str, prefix: str, xorb: str) -> int:
        self._cas_auth(instance, write=False)
        with self.server_hub._lock:
            present = xorb in self.server_hub._xorbs
        return self._send(200 if present else 404, b"", "text/plain; charset=utf-8")

    def _h_cas_shard(self, instance: str, version: str) -> int:
        hub = self.server_hub
        key = self._cas_auth(instance, write=True)
        try:
            rebuilt = self._rebuild_shard_files()
        except (XetFormatError, HubError) as e:
            message = f"shard verification failed: {e}"
            if version == "1":
                raise HubError(400, message) from None
            frames = [
                {"type": "validating", "verified": 0, "total": 1},
                {"type": "error", "message": message, "retryable": False},
            ]
            return self._send_ndjson(frames)
        with hub._lock:
            repo = hub._repos.get(key)
            if repo is not None:
                for content in rebuilt:
                    repo.lfs_objects[hashlib.sha256(content).hexdigest()] = content
        if version == "1":
            return self._send_json(200, {"result": 1})
        return self._send_ndjson(
            [
                {"type": "validating", "verified": 0, "total": 1},
                {"type": "validating", "verified": 1, "total": 1},
                {"type": "committing", "stage": "uploading"},
                {"type": "committing", "stage": "syncing"},
                {"type": "result"},
            ]
        )

    def _rebuild_shard_files(self) -> list[bytes]:
        """Every file the shard describes, put together from the stored xorbs' chunks."""
        files = []
        with self.server_hub._lock:
            xorbs = dict(self.server_hub._xorbs)
        for segments in parse_shard_files(self.body):
            parts = []
            for xorb, unpacked, start, end in segments:
                chunks = xorbs.get(xorb)
                if chunks is None:
                    raise XetFormatError(f"the shard names xorb {xorb}, which was not uploaded")
                if not 0 <= start < end <= len(chunks):
                    raise XetFormatError(
                        f"chunks {start}..{end} are out of xorb {xorb} ({len(chunks)} chunks)"
                    )
                segment = b"".join(chunks[start:end])
                if len(segment) != unpacked:
                    raise XetFormatError(
                        f"a segment of xorb {xorb} is {len(segment)} bytes, the shard says {unpacked}"
                    )
                parts.append(segment)
            files.append(b"".join(parts))
        return files

    def _h_cas_chunk(self, instance: str, prefix: str, chunk: str) -> int:
        self._cas_auth(instance, write=False)
        raise HubError(404, "chunk not tracked by global deduplication")

    def _h_cas_xorb_grant(self, instance: str, prefix: str, xorb: str) -> int:
        """Presigned "upload grants" are not offered: hf_xet then posts the xorb to the CAS itself."""
        self._cas_auth(instance, write=True)
        raise HubError(404, "xorb upload grants are not offered by the test Hub")

    def _h_cas_telemetry(self, instance: str | None = None) -> int:
        return self._send(200, b"", "text/plain; charset=utf-8")

    def _send_ndjson(self, frames: list[dict[str, Any]]) -> int:
        body = b"".join(json.dumps(frame).encode() + b"\n" for frame in frames)
        return self._send(200, body, "application/x-ndjson")

    def _h_commit(self, kind: str, ns: str, name: str, rev: str) -> int:
        hub = self.server_hub
        repo = self._repo(kind, ns, name)
        self._require_write(repo, "push to")
        self._refuse_if_switched("commit")
        self._check_rev(repo, rev)
        if self.query.get("create_pr"):
            raise HubError(400, "Pull requests (create_pr) are not implemented by the test Hub")
        try:
            lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"Invalid ndjson commit payload: {e}") from None
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if not isinstance(header, dict) or not header.get("summary"):
            raise HubError(400, "The commit needs a header with a summary")
        with hub._lock:
            if header.get("parentCommit") and header["parentCommit"] != repo.head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.files)
            binary, large = [], []
            for line in lines:
                key, value = line.get("key"), line.get("value") or {}
                path = value.get("path", "")
                if key == "file":
                    content = (
                        base64.b64decode(value.get("content", ""))
                        if value.get("encoding") == "base64"
                        else value.get("content", "").encode()
                    )
                    if len(content) >= LFS_THRESHOLD:
                        large.append(path)
                    elif _is_binary(content[:8000]):
                        binary.append(path)
                    files[path] = StoredFile(content, lfs=False)
                elif key == "lfsFile":
                    content = repo.lfs_objects.get(value.get("oid", ""))
                    if content is None:
                        raise HubError(
                            400,
                            f"Your push was rejected because an LFS pointer pointed to a file that does not exist: {path}",
                        )
                    files[path] = StoredFile(content, lfs=True)
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
                elif key != "header":
                    raise HubError(400, f"Unknown commit operation: {key}")
            if large:
                raise HubError(
                    400,
                    "Your push was rejected because it contains files larger than 10 MiB. Please use "
                    "https://git-lfs.github.com/ to store large files. Offending files: " + ", ".join(large),
                )
            if binary:
                raise HubError(
                    400,
                    "Your push was rejected because it contains binary files. Please use "
                    "https://huggingface.co/docs/hub/xet to store binary files. Offending files: "
                    + ", ".join(binary),
                )
            repo.files = files
            commit = hub._commit(
                repo,
                header["summary"],
                header.get("description") or "",
                self.account.user if self.account else "",
            )
        commit_url = f"{hub.url}/{GIT_URL_PREFIXES[repo.repo_type]}{repo.repo_id}/commit/{commit.oid}"
        return self._send_json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": commit_url,
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )


def start() -> HubServer:
    """A started :class:`HubServer` on a free loopback port (stop it with ``.stop()``)."""
    return HubServer().start()
