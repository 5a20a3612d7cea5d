"""Placeholder until the flowise dialect lands."""

from fastapi import APIRouter

router = APIRouter()
