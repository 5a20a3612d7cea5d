"""Image-to-video chatflows: the uploaded image and the question become the video's inputs."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
import requests
from flowise import Flowise, IFileUpload, PredictionData

from tests.conftest import API_KEY

pytestmark = pytest.mark.skipif(not (Path(__file__).parents[1] / "engine/video/worker.py").exists(),
                                reason="the image-to-video worker (engine/video/) is not built yet")

FLOW = "tiny-video-flow"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FILE_URL = re.compile(r"^http://127\.0\.0\.1:\d+/v1/files/([a-z0-9]+)/content$")


def png(color=(200, 40, 40)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return buffer.getvalue()


def stored_video(server, url: str) -> bytes:
    match = FILE_URL.match(url)
    assert match, url
    return server.server.config.app.state.files.read(match.group(1))


def test_multipart_image_upload_makes_a_video(live_server):
    response = requests.post(f"{live_server.url}/api/v1/prediction/{FLOW}", headers=AUTH,
                             files={"files": ("cat.png", png(), "image/png")},
                             data={"question": "the cat waves", "seed": "3"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["question"] == "the cat waves" and answer["chatMessageId"]
    assert stored_video(live_server, answer["text"])[4:8] == b"ftyp"


def test_sdk_json_upload_makes_a_video(live_server):
    data_uri = "data:image/png;base64," + base64.b64encode(png((10, 90, 200))).decode()
    client = Flowise(base_url=live_server.url, api_key=API_KEY)
    [answer] = list(client.create_prediction(PredictionData(
        chatflowId=FLOW, question="a blue sky",
        uploads=[IFileUpload(data=data_uri, type="file", name="sky.png", mime="image/png")])))
    assert stored_video(live_server, answer["text"])[4:8] == b"ftyp"


def test_video_flow_needs_an_image(live_server):
    response = requests.post(f"{live_server.url}/api/v1/prediction/{FLOW}", headers=AUTH,
                             json={"question": "no image"})
    body = response.json()
    assert response.status_code == 400 and body["success"] is False and "image" in body["message"]
