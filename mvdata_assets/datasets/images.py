"""What counts as an image: an answer's error kind (link rot, refusals, pages instead of images) or its format.

An answer counts as an image only if it is a 200 with an image (or unlabelled) content type whose bytes start with
JPEG/PNG/GIF/WebP magic and end as that format ends (and, when the list asks to `decode`, that Pillow decodes in
full); otherwise its URL fails with an error kind, so link rot is reported as link rot and a parsing mistake can't
pass for it. Plain Python.
"""

from __future__ import annotations

import io

import pycurl

from mvdata_assets.datasets.transport import BODY_TOO_BIG, Request, TransientError, status_error

# labels that don't say what the bytes are: the magic bytes decide
UNLABELLED_TYPES = {"", "application/octet-stream", "binary/octet-stream", "application/binary"}

ERROR_KINDS = {
    "http_404": "link rot: the image is gone",
    "http_410": "link rot: the image was removed",
    "http_403": "refused: a removed photo or hot-link protection",
    "dns": "link rot: the host name no longer resolves",
    "connection": "host down or refusing connections (after retries)",
    "blocked_address": "the name or a redirect led to a private, loopback or link-local address (never fetched)",
    "timeout": "no data within the timeout (a dead or overloaded host)",
    "not_an_image": "a page or placeholder instead of an image (often a removed photo)",
    "truncated": "the image was cut off",
    "too_large": "larger than the size limit",
    "undecodable": "image bytes that do not decode (corrupt inside)",
    "invalid_url": "not an http(s) URL in the list",
}


def describe_error_kind(kind: str) -> str:
    if kind in ERROR_KINDS:
        return ERROR_KINDS[kind]
    if kind.startswith("http_5") or kind == "http_429":
        return "server error or rate limit (after retries)"
    return "HTTP error" if kind.startswith("http_") else "other"


def sniff(body: bytes) -> str | None:
    """The image format the bytes start as (its file extension), or None."""
    if body.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if body.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if body.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "webp"
    return None


def complete(ext: str, body: bytes) -> bool:
    """Whether the bytes end as their format ends: a cut-off body is caught without decoding it."""
    if ext == "jpg":
        return body.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    if ext == "png":
        return body.endswith(b"IEND\xaeB`\x82")
    if ext == "gif":
        return body.rstrip(b"\x00").endswith(b";")
    return len(body) >= 8 + int.from_bytes(body[4:8], "little")  # webp: the RIFF size


def classify(request: Request, body: bytes) -> tuple[str | None, str | None, str | None]:
    """(error kind, error, extension) of a finished transfer; the kind is None for an image."""
    if request.error_code == BODY_TOO_BIG:  # libcurl stopped the body at the limit
        if request.status != 200:
            return f"http_{request.status}", f"HTTP {request.status}", None
        return "too_large", f"larger than {request.whole_up_to} bytes", None
    if request.failure is not None:
        raise request.failure
    if request.blocked:
        return "blocked_address", f"refused to connect: {request.blocked}", None
    if request.error_code == pycurl.E_OPERATION_TIMEDOUT:
        return "timeout", request.error, None
    if request.error_code == pycurl.E_PARTIAL_FILE:
        return "truncated", request.error, None
    if request.error_code == pycurl.E_COULDNT_RESOLVE_HOST:
        return "dns", request.error, None
    if request.error_code:
        return "connection", request.error, None
    if request.status != 200:
        return f"http_{request.status}", f"HTTP {request.status}", None
    content_type = request.response_headers.get("content-type", "").split(";")[0].strip().lower()
    if not content_type.startswith("image/") and content_type not in UNLABELLED_TYPES:
        return "not_an_image", f"content type {content_type}", None
    ext = sniff(body)
    if ext is None:
        return "not_an_image", f"not JPEG/PNG/GIF/WebP (starts {body[:8]!r})", None
    if not complete(ext, body):
        return "truncated", f"{ext} cut off after {len(body)} bytes", None
    return None, None, ext


def decode(body: bytes) -> tuple[str | None, tuple[int, int] | None]:
    """(error, (width, height)) of decoding the image fully with Pillow: corruption inside the file shows here."""
    from PIL import Image  # only when a list asks for decoding

    try:
        with Image.open(io.BytesIO(body)) as image:
            image.load()
            return None, image.size
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a bad file; each is this URL's outcome
        return f"does not decode: {exc}", None


def is_transient(request: Request, kind: str | None) -> bool:
    """A failure worth another attempt: the server was busy or refused the connection, not gone or wrong."""
    if kind == "connection":  # not timeouts: at list scale those are mostly dead hosts
        return request.error_code in (pycurl.E_COULDNT_CONNECT, pycurl.E_RECV_ERROR, pycurl.E_GOT_NOTHING)
    return isinstance(status_error(request.status, request.url, None), TransientError)  # the downloader's rule
