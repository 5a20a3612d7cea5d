"""Placeholder until the replicate dialect lands."""

from fastapi import APIRouter

router = APIRouter()
