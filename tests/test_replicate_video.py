"""Image-to-video through the Replicate-style API: file inputs, progress logs, mp4 output by URL."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from replicate.exceptions import ReplicateError

from tests.conftest import API_KEY
from tests.test_replicate import sdk

MODEL = "ember/tiny-i2v"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def png(color=(200, 40, 40)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, "PNG")
    return buffer.getvalue()


def test_run_with_an_uploaded_file_answers_an_mp4_url(live_server):
    image = io.BytesIO(png())
    image.name = "red.png"
    output = sdk(live_server).run(MODEL, input={"prompt": "a red square", "image": image})
    assert isinstance(output, str) and output.startswith(f"{live_server.url}/v1/files/")
    video = httpx.get(output)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert video.content[4:8] == b"ftyp"


def test_stream_shows_progress_then_the_video(live_server):
    data_uri = "data:image/png;base64," + base64.b64encode(png((0, 90, 200))).decode()
    events = list(sdk(live_server).stream(MODEL, input={"prompt": "blue", "image": data_uri,
                                                        "num_inference_steps": 3}))
    kinds = [e.event.value for e in events]
    logs = [e.data for e in events if e.event.value == "logs"]
    assert "step 3/3" in logs and kinds[-2:] == ["output", "done"]
    assert str(events[-2].data).endswith("/content")


def test_unusable_image_urls_are_refused_at_creation(live_server):
    """A URL that cannot be fetched is a 422 when the prediction is created, not a failed
    prediction later."""
    body = {"prompt": "x", "image": "http://example.invalid/cat.png"}
    client = sdk(live_server)
    with pytest.raises(ReplicateError) as info:
        client.models.predictions.create(model=MODEL, input=body)
    assert info.value.status == 422 and "image" in info.value.detail
    response = httpx.post(f"{live_server.url}/v1/run", headers=AUTH, json={"model": MODEL, "input": body})
    assert response.status_code == 422 and "image" in response.json()["detail"]


@pytest.mark.parametrize("inputs, field", [({"prompt": "x"}, "image"),
                                           ({"prompt": "x", "image": "a", "max_frames": 1000}, "max_frames"),
                                           ({"prompt": "x", "image": "a", "strength": 1}, "strength")])
def test_video_inputs_are_validated_against_the_schema(client, inputs, field):
    response = client.post("/v1/predictions", json={"version": MODEL, "input": inputs})
    assert response.status_code == 422 and field in response.json()["detail"]


def test_family_rules_are_checked_before_the_job_is_queued(client):
    image = "data:image/png;base64," + base64.b64encode(png()).decode()
    response = client.post("/v1/run", json={"model": MODEL, "input": {"prompt": "x", "image": image, "width": 33}})
    assert response.status_code == 422 and "width must be a multiple" in response.json()["detail"]
