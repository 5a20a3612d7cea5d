"""Placeholder until the openai dialect lands."""

from fastapi import APIRouter

router = APIRouter()
