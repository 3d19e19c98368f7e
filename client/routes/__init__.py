"""The local server's routes, one module per resource; ``client.server.create_app`` assembles them."""

from __future__ import annotations

from fastapi import APIRouter

from . import datasets, jobs, page, provider, webhooks

ROUTERS: tuple[APIRouter, ...] = (page.router, datasets.router, provider.router, jobs.router, webhooks.router)
