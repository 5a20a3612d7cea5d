"""The conditioning image: from a data URI, one of our uploaded files, or a public http(s) URL
(fetched through engine/urls.py's guarded fetcher).

Everything that can go wrong with a client's image becomes an InvalidInput naming the problem,
checked in order of cost: the encoded size before decoding, the pixel count from the header
before the pixels are decoded, and only then the pixels themselves.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
from typing import Callable

from PIL import Image, ImageOps, UnidentifiedImageError

from engine import urls
from engine.errors import InvalidInput

MAX_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def decode_image(value, *, resolve_file: Callable[[str], bytes | None], allow_http: bool = True,
                 allow_private: bool = False, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
                 timeout_s: float = 10.0, param: str = "image") -> Image.Image:
    """Decode an image input to an RGB PIL image.

    `value` is a data URI, a string that `resolve_file` recognises as one of our files (URL or
    id; it returns the bytes, or None when the string is not ours), an http(s) URL (fetched
    when `allow_http`, from public addresses unless `allow_private`; this blocks, so call it off
    the event loop), raw bytes or a PIL image."""
    if isinstance(value, Image.Image):
        return _to_rgb(value)
    if isinstance(value, (bytes, bytearray)):
        return _decode(bytes(value), max_bytes, max_pixels, param)
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{param} must be a data URI, a file URL or an http(s) URL", param=param)
    value = value.strip()
    if value[:5].lower() == "data:":
        return _decode(_data_uri_bytes(value, max_bytes, param), max_bytes, max_pixels, param)
    data = resolve_file(value)
    if data is not None:
        return _decode(data, max_bytes, max_pixels, param)
    scheme = urllib.parse.urlsplit(value).scheme.lower()
    if scheme in ("http", "https"):
        if not allow_http:
            raise InvalidInput(f"{param}: fetching images from http(s) URLs is disabled on this server; "
                               "send a data URI or upload the file first", param=param)
        return _decode(_fetch(value, max_bytes, timeout_s, allow_private, param), max_bytes, max_pixels, param)
    raise InvalidInput(f"{param} must be a data URI, an uploaded file's URL or id, or an http(s) URL; "
                       f"got {value[:60]!r}", param=param)


def _data_uri_bytes(uri: str, max_bytes: int, param: str) -> bytes:
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise InvalidInput(f"{param}: malformed data URI (no comma before the data)", param=param)
    media_type, *options = header.split(";")
    if media_type and not media_type.lower().startswith("image/") and media_type != "application/octet-stream":
        raise InvalidInput(f"{param}: data URI has media type {media_type!r}, expected an image", param=param)
    if "base64" not in (o.lower() for o in options):
        return urllib.parse.unquote_to_bytes(payload)
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > max_bytes:
        raise InvalidInput(f"{param} is larger than the {max_bytes} byte limit", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{param}: data URI is not valid base64", param=param) from None


def _fetch(url: str, max_bytes: int, timeout_s: float, allow_private: bool, param: str) -> bytes:
    try:
        return urls.fetch(url, max_bytes=max_bytes, timeout_s=timeout_s, allow_private=allow_private)
    except urls.URLRefused as exc:
        raise InvalidInput(f"{param}: {exc}", param=param) from None


def _decode(data: bytes, max_bytes: int, max_pixels: int, param: str) -> Image.Image:
    if len(data) > max_bytes:
        raise InvalidInput(f"{param} is larger than the {max_bytes} byte limit", param=param)
    if not data:
        raise InvalidInput(f"{param} is empty", param=param)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
        raise InvalidInput(f"{param} is not a readable image (expected {', '.join(FORMATS)})",
                           param=param) from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidInput(f"{param} is {width}x{height} pixels; the limit is {max_pixels} pixels",
                           param=param)
    try:
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise InvalidInput(f"{param} is corrupt or truncated", param=param) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited over white (dropping alpha would expose whatever
    colour the transparent pixels happen to hold)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")
