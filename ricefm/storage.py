"""Where a dataset lives, as one URL: a local folder, an S3-compatible bucket prefix or a GCS one.

``/data/rice``, ``file:///data/rice``, ``s3://bucket/corpus/rice`` and ``gs://bucket/rice`` all
parse to a :class:`Location`; readers and builders ask it for TensorStore kvstore specs (the
shard arrays) and for whole small objects (manifest, vocabulary, completion markers). Everything
else about object stores stays here.

Credentials and endpoints come only from the standard environment, never from flags, so they
never reach a log or an error message:
- S3 and S3-compatible stores (MinIO, Huawei OBS, Ceph): ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``), else TensorStore's default chain
  (``~/.aws``, instance roles); ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for a non-AWS
  endpoint; ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.
- GCS: application-default credentials (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud, metadata server).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ricefm.errors import RiceFMInputError

REMOTE_SCHEMES = {"s3": "s3", "gs": "gcs"}


def is_remote(text: str | os.PathLike) -> bool:
    return urlparse(str(text)).scheme in REMOTE_SCHEMES


def _s3_options() -> dict[str, Any]:
    spec: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):  # keys in the environment: use them, skip the profile-file search
        spec["aws_credentials"] = {"type": "environment"}
    return spec


def reason(e: BaseException) -> str:
    """TensorStore's status line without the request ids and response bodies it appends."""
    text = str(e).split(" [", 1)[0].strip()
    return text[:200]


@dataclass(frozen=True)
class Location:
    """A dataset root. ``url`` is what messages show (it never holds a secret)."""

    url: str
    driver: str  # "file", "s3" or "gcs"
    bucket: str = ""
    prefix: str = ""  # object-key prefix, no leading or trailing "/" ("" = the bucket's root)

    @classmethod
    def parse(cls, text: str | os.PathLike) -> "Location":
        raw = str(text)
        parsed = urlparse(raw)
        if parsed.scheme in REMOTE_SCHEMES:
            if not parsed.netloc:
                raise RiceFMInputError(f"{raw}: no bucket; write {parsed.scheme}://BUCKET/PREFIX")
            prefix = parsed.path.strip("/")
            return cls(f"{parsed.scheme}://{parsed.netloc}" + (f"/{prefix}" if prefix else ""),
                       REMOTE_SCHEMES[parsed.scheme], parsed.netloc, prefix)
        if parsed.scheme == "file":
            raw = parsed.path
        elif parsed.scheme and len(parsed.scheme) > 1:  # not a Windows drive letter
            raise RiceFMInputError(f"{raw}: unsupported URL scheme {parsed.scheme!r}; use a path, file://, s3:// or gs://")
        path = Path(raw).expanduser().resolve()
        return cls(str(path), "file", prefix=str(path))

    @property
    def remote(self) -> bool:
        return self.driver != "file"

    @property
    def path(self) -> Path:
        """The local folder (local locations only)."""
        if self.remote:
            raise ValueError(f"{self.url} is not a local folder")
        return Path(self.prefix)

    def show(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def kvstore(self, rel: str = "") -> dict[str, Any]:
        """The TensorStore kvstore spec of ``rel`` under this root (a folder or prefix when it ends in "/")."""
        folder = "/" if rel.endswith("/") else ""
        rel = rel.strip("/")
        if not self.remote:
            return {"driver": "file", "path": str(self.path / rel) + folder}
        key = "/".join(p for p in (self.prefix, rel) if p)
        spec = {"driver": self.driver, "bucket": self.bucket, "path": key + folder}
        if self.driver == "s3":
            spec.update(_s3_options())
        return spec

    # ------------------------------------------------------------------ whole objects
    def _store(self):
        import tensorstore as ts

        key = (self, json.dumps(_s3_options(), sort_keys=True) if self.driver == "s3" else "")
        if key not in _OPEN:
            try:
                spec = {"driver": self.driver, "bucket": self.bucket, "path": f"{self.prefix}/" if self.prefix else ""}
                if self.driver == "s3":
                    spec.update(_s3_options())
                _OPEN[key] = ts.KvStore.open(spec).result()
            except ValueError as e:
                raise RiceFMInputError(f"{self.url}: cannot open ({reason(e)})") from None
        return _OPEN[key]

    def _remote_call(self, what: str, rel: str, fn):
        try:
            return fn()
        except ValueError as e:
            raise RiceFMInputError(f"{self.show(rel)}: cannot {what} ({reason(e)}); check the bucket name and "
                                   "the AWS_* / Google credentials in the environment") from None

    def read(self, rel: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        if not self.remote:
            p = self.path / rel
            return p.read_bytes() if p.is_file() else None
        r = self._remote_call("read", rel, lambda: self._store().read(rel).result())
        return bytes(r.value) if r.state == "value" else None

    def write(self, rel: str, data: bytes) -> None:
        """Write one object whole (one PUT on object stores: atomic; temp + rename locally)."""
        if not self.remote:
            from ricefm.atomic import write_bytes_atomic

            (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.path / rel, data)
            return
        self._remote_call("write", rel, lambda: self._store().write(rel, data).result())

    def keys(self, rel: str = "") -> list[str]:
        """Every key under ``rel`` (recursive), relative to this root, sorted."""
        if not self.remote:
            base = self.path / rel
            if not base.is_dir():
                return []
            return sorted(p.relative_to(self.path).as_posix() for p in base.rglob("*") if p.is_file())
        import tensorstore as ts

        store = self._store()
        if rel:
            start = rel.rstrip("/") + "/"
            found = self._remote_call("list", rel, lambda: store.list(ts.KvStore.KeyRange(start, start[:-1] + "0"))
                                      .result())
        else:
            start, found = "", self._remote_call("list", rel, lambda: store.list().result())
        # the range is a hint some servers ignore (gcp-storage-emulator lists the whole bucket)
        return sorted(k for k in (k.decode() for k in found) if k.startswith(start))

    def delete(self, rel: str) -> None:
        """Remove one object (or, locally, one file); absent is fine."""
        if not self.remote:
            (self.path / rel).unlink(missing_ok=True)
            return
        # one DELETE of this key; a range delete would list first and trust the listing
        self._remote_call("delete", rel, lambda: self._store().write(rel, None).result())


_OPEN: dict = {}
