"""KVortex built-in storage tiers (cpu, disk, redis, s3), each one small module."""

from __future__ import annotations

__version__ = "0.1.0"
