"""The playground: one static page at `/` and `/playground` that talks to the public APIs only.

The page itself needs no key (it holds no data); every call it makes sends the key typed into it,
so it works the same with auth on or off.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@lru_cache(maxsize=1)
def page() -> str:
    return files("server").joinpath("static/playground.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
@router.get("/playground", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(page(), headers={"Cache-Control": "no-cache"})
