"""Pravāha's client SDK: `Client` (sync) and `AsyncClient` (asyncio)."""

from .aio import AsyncClient
from .client import Client, QueueFull
from .names import Names
from .wire import Completion, Result, TokenEvent, Usage

__all__ = ["AsyncClient", "Client", "Completion", "Names", "QueueFull", "Result", "TokenEvent", "Usage"]
