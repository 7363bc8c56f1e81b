"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from tests.pg import PostgresSite, postgres_site


@pytest_asyncio.fixture
async def pg_site(tmp_path: Path) -> AsyncIterator[PostgresSite]:
    """A site's schema of its own on the session's PostgreSQL cluster."""
    site = await postgres_site(tmp_path)
    yield site
    await site.destroy()
