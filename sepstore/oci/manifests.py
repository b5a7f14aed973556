"""Manifest calls of the OCI registry client (:mod:`sepstore.oci.client`): image manifests by tag or
digest, tag lists page by page, and referrers."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from typing import Any, Final

from ..errors import IntegrityError, NotFoundError, RegistryError
from ..retry import with_retries
from .blobs import checked_digest
from .transport import Transport

__all__ = ["DOCKER_MANIFEST", "MAX_MANIFEST_BYTES", "OCI_INDEX", "OCI_MANIFEST", "ManifestCalls"]

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
#: Image manifests larger than this are refused (distribution's own limit is 4 MiB).
MAX_MANIFEST_BYTES: Final = 4 * 1024 * 1024
#: Tag-list pages are read up to this size; a repository's whole tag list up to these many tags
#: and bytes of pages, so that a registry linking page after page cannot fill the memory.
_MAX_TAGS_PAGE_BYTES = 8 * 1024 * 1024
MAX_TAGS: Final = 100_000
MAX_TAGS_BYTES: Final = 64 * 1024 * 1024
#: Pages of a tag list read at most (a registry paging 50 tags at a time lists 100,000 tags in 2,000):
#: a list of empty pages, each linking to a new one, costs no tags and few bytes, but one request each.
MAX_TAG_PAGES = 2_000


class ManifestCalls(Transport):
    """The manifest, tag and referrers calls of a registry client."""

    def get_manifest(
        self, repository: str, reference: str, *, accept: tuple[str, ...] = (OCI_MANIFEST,)
    ) -> tuple[bytes, str, str]:
        """The manifest ``reference`` (a tag or ``sha256:`` digest) names: its bytes, media type and
        digest (checked against the bytes when ``reference`` is a digest)."""
        path = f"/v2/{repository}/manifests/{reference}"
        url = self.base + path

        def get() -> tuple[bytes, str, str]:
            answer = self.request("GET", path, scope=self.scope(repository), headers={"Accept": ", ".join(accept)})
            try:
                data = answer.read(MAX_MANIFEST_BYTES, "the manifest")
            finally:
                answer.close()
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            if reference.startswith("sha256:") and digest != reference:
                raise IntegrityError(f"{url}: the manifest's SHA-256 is {digest}, not the {reference} asked for")
            media = (answer.header("Content-Type") or "").split(";")[0].strip()
            return data, media, digest

        return with_retries(get, url)

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> tuple[str, bool]:
        """Put a manifest under ``reference`` (a tag, or its own digest); its digest, and whether the
        registry said it indexed its ``subject`` (the referrers API: the ``OCI-Subject`` header)."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise RegistryError(f"a manifest of {len(data)} bytes is over the {MAX_MANIFEST_BYTES}-byte limit")
        path = f"/v2/{repository}/manifests/{reference}"
        digest = "sha256:" + hashlib.sha256(data).hexdigest()

        def put() -> tuple[str, bool]:
            answer = self.request(
                "PUT",
                path,
                scope=self.scope(repository, "pull", "push"),
                headers={"Content-Type": media_type},
                body=data,
                ok=(201,),
            )
            answer.close()
            said = answer.header("Docker-Content-Digest")
            if said is not None and said != digest:
                raise IntegrityError(f"{self.base}{path}: the registry stored the manifest as {said}, not {digest}")
            return digest, answer.header("OCI-Subject") is not None

        return with_retries(put, self.base + path)

    def delete_manifest(self, repository: str, digest: str) -> None:
        path = f"/v2/{repository}/manifests/{checked_digest(digest)}"
        scope = self.scope(repository, "pull", "push", "delete")
        with_retries(lambda: self.request("DELETE", path, scope=scope, ok=(202,)).close(), self.base + path)

    def tags(self, repository: str) -> list[str]:
        """Every tag of ``repository``, page by page as the registry's ``Link`` headers lead; a list
        over :data:`MAX_TAGS` tags, :data:`MAX_TAGS_BYTES` bytes or :data:`MAX_TAG_PAGES` pages, or a next
        page already read, is refused."""
        found: list[str] = []
        path: str | None = f"{self.base}/v2/{repository}/tags/list?n=1000"
        seen: set[str] = set()
        size = 0
        while path is not None:
            seen.add(path)
            page, path, page_size = self._tags_page(repository, path)
            found += page
            size += page_size
            if len(found) > MAX_TAGS or size > MAX_TAGS_BYTES:
                raise RegistryError(
                    f"{self.base}/v2/{repository}/tags/list: repository {repository} lists over {MAX_TAGS} tags "
                    f"or {MAX_TAGS_BYTES} bytes of them; refused"
                )
            if path is not None and len(seen) >= MAX_TAG_PAGES:
                raise RegistryError(
                    f"{self.base}/v2/{repository}/tags/list: the tag list of repository {repository} "
                    f"goes on past {MAX_TAG_PAGES} pages; refused"
                )
            if path in seen:
                raise RegistryError(
                    f"{self.base}/v2/{repository}/tags/list: the tag list of repository {repository} "
                    f"links back to a page already read ({path}); refused"
                )
        return found

    def _tags_page(self, repository: str, path: str) -> tuple[list[str], str | None, int]:
        """One page of the tag list: its tags, the next page's URL (if any) and the page's size in bytes."""

        def get() -> tuple[list[str], str | None, int]:
            answer = self.request("GET", path, scope=self.scope(repository))
            try:
                data = answer.read(_MAX_TAGS_PAGE_BYTES, "the tag list")
            finally:
                answer.close()
            try:
                tags = json.loads(data).get("tags") or []
            except (ValueError, AttributeError):
                raise RegistryError(f"{answer.url}: the tag list is not JSON") from None
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise RegistryError(f"{answer.url}: the tag list's `tags` is not a list of strings")
            link = answer.header("Link")
            match = re.match(r'\s*<([^>]+)>\s*;\s*rel="?next"?', link or "")
            following = urllib.parse.urljoin(answer.url, match.group(1)) if match else None
            elsewhere = following is not None and _netloc(following) != _netloc(answer.url)
            if elsewhere:
                raise RegistryError(f"{answer.url}: the tag list's next page is on another host ({following})")
            return tags, following, len(data)

        return with_retries(get, path)

    def referrers(self, repository: str, digest: str, artifact_type: str | None = None) -> list[dict[str, Any]] | None:
        """The descriptors of manifests whose ``subject`` is ``digest`` (the referrers API), or
        ``None`` when the registry lacks that API (the caller falls back to the tag schema)."""
        query = f"?{urllib.parse.urlencode({'artifactType': artifact_type})}" if artifact_type else ""
        path = f"/v2/{repository}/referrers/{checked_digest(digest)}{query}"

        def get() -> list[dict[str, Any]] | None:
            try:
                answer = self.request("GET", path, scope=self.scope(repository))
            except NotFoundError:
                return None
            try:
                if (answer.header("Content-Type") or "").split(";")[0].strip() != OCI_INDEX:
                    return None
                data = answer.read(MAX_MANIFEST_BYTES, "the referrers index")
            finally:
                answer.close()
            return _descriptors(data, self.base + path)

        return with_retries(get, self.base + path)


def _descriptors(data: bytes, url: str) -> list[dict[str, Any]]:
    """The ``manifests`` of an image index, each a mapping."""
    try:
        manifests = json.loads(data).get("manifests") or []
    except (ValueError, AttributeError):
        raise RegistryError(f"{url}: the image index is not JSON") from None
    if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
        raise RegistryError(f"{url}: the image index's `manifests` is not a list of descriptors")
    return manifests


def _netloc(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc
