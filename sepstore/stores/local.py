"""A store on local disk. Writes never leave a partial file under a final name: a file is written under
a temporary name in its folder, fsynced, renamed into place and its folder fsynced (so a power loss
leaves it whole or absent, as git and SQLite do); manifests are created with a hard link (atomic),
and read-modify-writes of a tag are serialised by a lock file (:meth:`LocalStore.tag_lock`)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

from ..manifest import Blob
from ..safetensors_io import WRITE_PIECE
from ..store import backend_errors, create_temp, file_lock, fsync_dir, make_dirs, replace_durably, staged
from .fsspec import FsspecStore

__all__ = ["LocalStore"]


class LocalStore(FsspecStore):
    """A store in a local folder (a path or ``file://``)."""

    def url_of(self, path: str) -> str:
        return path

    def _place(self, tmp: str, final: str) -> None:
        replace_durably(tmp, final)

    def _reused(self, final: str) -> None:
        with backend_errors(final), contextlib.suppress(FileNotFoundError):
            os.utime(final)

    def _staging(self) -> str:
        """The parts folder, so that a staged file is renamed into place atomically."""
        staging = self.parts_dir
        with backend_errors(staging):
            make_dirs(staging)
        return staging

    def put_blob_file(self, path: str, blob: Blob, *, replace: bool = False) -> bool:
        """Copy the file into the parts folder under a temporary name first (the source may be on
        another filesystem), then rename it into place."""
        fd, tmp = create_temp(self._staging(), ".safetensors")
        try:
            with backend_errors(self.parts_dir), os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, WRITE_PIECE)  # a full disk: a StoreError naming the store
            return self._commit(tmp, blob, replace=replace)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_lease(self, lease_id: str, data: bytes) -> None:
        """Written under a temporary name and renamed; not fsynced (a lease matters only while the
        process that wrote it runs)."""
        path = self.lease_path(lease_id)
        with backend_errors(path):
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            fd, tmp = create_temp(folder, ".json")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def write_manifest_bytes(
        self, name: str, tag: str, data: bytes, *, create: bool = False, if_version: str | None = None
    ) -> bool:
        """Written durably; with ``create``, linked into place only if the tag holds none (atomic).
        ``if_version`` is not used: :meth:`tag_lock` serialises read-modify-writes instead."""
        path = self.manifest_path(name, tag)
        with backend_errors(path), staged(path, data) as tmp:
            if not create:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
            fsync_dir(os.path.dirname(path))
            return True

    @contextlib.contextmanager
    def tag_lock(self, name: str, tag: str) -> Iterator[None]:
        path = self.manifest_path(name, tag)
        with backend_errors(path):
            make_dirs(os.path.dirname(path))
        with file_lock(path + ".lock"):
            yield

    def write_signature_bytes(self, name: str, tag: str, key_id: str, data: bytes) -> None:
        """Written durably, replacing that key's previous signature of the tag."""
        path = self.signature_path(name, tag, key_id)
        with backend_errors(path), staged(path, data) as tmp:
            os.replace(tmp, path)
            fsync_dir(os.path.dirname(path))
