"""The ``kvortex`` command line (typer + rich)."""
