"""Hook markers. Third-party plugins import only ``hookimpl`` (re-exported by ``kvortex_core``)."""

from __future__ import annotations

import pluggy

PROJECT = "kvortex"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
