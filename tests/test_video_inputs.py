"""Decoding the conditioning image: data URIs, our files, http(s) URLs where allowed, and every
way a client's image can be bad."""

from __future__ import annotations

import threading
import urllib.parse
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from engine.errors import InvalidInput
from engine.video.inputs import decode_image
from tests.video_fixtures import data_uri, png_bytes, test_image



def no_files(value: str) -> bytes | None:
    return None


decode = partial(decode_image, resolve_file=no_files)


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP"])
def test_data_uri(format):
    image = decode(data_uri(png_bytes(test_image(), format), f"image/{format.lower()}"))
    assert image.mode == "RGB" and image.size == (40, 32)


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (10, 200, 30, 0))
    assert decode(data_uri(png_bytes(rgba))).getpixel((0, 0)) == (255, 255, 255)


def test_our_files_by_id_or_url():
    files = {"file-123": png_bytes(test_image()), "http://ember.local/v1/files/abc": png_bytes(test_image(8, 8))}
    assert decode_image("file-123", resolve_file=files.get).size == (40, 32)
    # Our own file URLs resolve even where fetching from the web is disabled.
    assert decode_image("http://ember.local/v1/files/abc", resolve_file=files.get).size == (8, 8)


def test_http_urls_can_be_turned_off():
    with pytest.raises(InvalidInput, match="disabled on this server") as info:
        decode("https://example.com/cat.png", allow_http=False)
    assert info.value.param == "image" and info.value.status == 422


def test_http_urls_to_private_addresses_are_refused_by_default(image_server):
    with pytest.raises(InvalidInput, match="not a public address") as info:
        decode(f"{image_server}/cat.png")
    assert info.value.param == "image" and info.value.status == 422


@pytest.fixture
def image_server():
    body = png_bytes(test_image())

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/cat.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_http_urls_on_a_trusted_network(image_server):
    assert decode(f"{image_server}/cat.png", allow_private=True).size == (40, 32)
    with pytest.raises(InvalidInput, match="could not fetch"):
        decode(f"{image_server}/missing.png", allow_private=True)
    with pytest.raises(InvalidInput, match="byte limit"):
        decode(f"{image_server}/cat.png", allow_private=True, max_bytes=100)


@pytest.mark.parametrize("value, message", [
    ("data:image/png;base64,!!!notbase64", "not valid base64"),
    ("data:image/png;base64", "malformed data URI"),
    (data_uri(b"hello, world", "text/plain"), "media type 'text/plain'"),
    (data_uri(b"hello, world"), "not a readable image"),
    (data_uri(png_bytes(test_image())[:120]), "corrupt or truncated"),
    (data_uri(b""), "empty"),
    ("data:image/png," + urllib.parse.quote(b"GIF8"), "not a readable image"),
    ("ftp://example.com/cat.png", "must be a data URI"),
    ("", "must be a data URI"),
    (42, "must be a data URI"),
])
def test_bad_images_are_invalid_input(value, message):
    with pytest.raises(InvalidInput, match=message):
        decode(value)


def test_size_limits():
    big = data_uri(png_bytes(test_image(200, 100)))
    with pytest.raises(InvalidInput, match="200x100 pixels; the limit is 10000"):
        decode(big, max_pixels=10_000)
    with pytest.raises(InvalidInput, match="byte limit"):
        decode(big, max_bytes=1000)
    assert decode(big).size == (200, 100)
