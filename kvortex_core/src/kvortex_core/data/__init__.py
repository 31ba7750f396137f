"""Data plane: moving bytes (pinned host pool, KV layouts, transfer engine, payload format)."""
