"""The async database engine and sessions (SQLAlchemy over psycopg 3).

The request owns the transaction: `session_scope` commits at the end or rolls back on error;
services only flush.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

from core import tracing
from core.settings import Settings, normalize_database_url


def create_engine(settings: Settings | None = None, *, url: str | None = None) -> AsyncEngine:
    target = normalize_database_url(url) if url else settings.database_url if settings else None
    if target is None:
        raise ValueError("create_engine needs settings or a url")
    pool = settings.database_pool_size if settings else 5
    engine = create_async_engine(
        target,
        pool_size=pool,
        max_overflow=pool,
        pool_pre_ping=True,
        pool_recycle=1800,
    )
    tracing.instrument_engine(engine)  # database spans when tracing is on
    return engine


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


@asynccontextmanager
async def session_scope(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One transaction: commit on success, roll back on any error."""
    async with factory() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise
