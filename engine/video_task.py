"""Video jobs: validated inputs to a decoded image, through the video worker, to an mp4 file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from engine.files import FileStore
from engine.jobs import Job

OUR_FILE = re.compile(r"(?:^|/)v1/files/([a-z0-9]{8,64})(?:/content)?/?$")


@dataclass
class VideoTask:
    inputs: dict  # validated against the version's schema, defaults filled
    inline: bool = False  # answer a data URI instead of a file URL


def file_resolver(files: FileStore) -> Callable[[str], bytes | None]:
    """Bytes of one of our files named by URL (`.../v1/files/<id>[/content]`) or bare id."""

    def resolve(value: str) -> bytes | None:
        match = OUR_FILE.search(value) or re.fullmatch(r"([a-z0-9]{26})", value)
        if not match:
            return None
        try:
            return files.read(match.group(1))
        except Exception:  # noqa: BLE001 - unknown id: not ours
            return None

    return resolve


def load_image(task: VideoTask, files: FileStore, allow_http: bool, allow_private: bool = False) -> None:
    """Fetch and decode the task's image in place (InvalidInput when it is unusable). Callers that
    queue a job before its model is ready run this first, so a bad image is a 422 at creation
    rather than a failed prediction later. Blocking: call it off the event loop."""
    from engine.video.inputs import decode_image

    if "image" in task.inputs:
        task.inputs["image"] = decode_image(task.inputs["image"], resolve_file=file_resolver(files),
                                            allow_http=allow_http, allow_private=allow_private)


def prepare(task: VideoTask, job: Job, files: FileStore, allow_http: bool, family, allow_private: bool = False):
    """Decode the image and check the family's rules (frame counts, size multiples) now, so bad
    inputs are a 422 before the job is queued."""
    from engine.video.worker import VideoRequest

    load_image(task, files, allow_http, allow_private)
    inputs = dict(task.inputs)
    family.normalize(inputs)
    return VideoRequest(request_id=job.id, inputs=inputs)


async def run(job: Job, request, worker, files: FileStore, file_url: Callable[[str], str],
              inline: bool) -> None:
    """Forward progress lines as logs; store the mp4 and answer its URL (or a data URI)."""
    import base64

    async for event in worker.generate(request):
        if event.type == "logs":
            job.emit("logs", event.text)
        elif event.type == "output":
            stored = files.put(event.video, f"{job.id}.mp4", "video/mp4",
                               metadata={"prediction": job.id, "frames": event.frames}, owner=job.owner)
            job.extra["file_id"] = stored.id
            job.output = ("data:video/mp4;base64," + base64.b64encode(event.video).decode()) if inline \
                else file_url(stored.id)
            job.emit("output", job.output)
            job.finish("succeeded")
        elif event.type == "error":
            canceled = job.cancel_requested or (event.error or "").lower().startswith("cancel")
            job.finish("canceled" if canceled else "failed", None if canceled else event.error)
    if not job.done:
        job.finish("failed", "the video worker ended without an output")
