"""What a wheel of each distribution carries for its users: typing marker, license, messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = {"kvortex_core": "kvortex_core", "kvortex_backends": "kvortex_backends", "kvortex_vllm": "kvortex_vllm"}


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_each_member_ships_py_typed_and_its_license(member: str) -> None:
    """py.typed: plugin authors type-check against the package; LICENSE: what the metadata declares."""
    assert (ROOT / member / "src" / MEMBERS[member] / "py.typed").is_file()
    license_text = (ROOT / member / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert 'license = "Apache-2.0"' in (ROOT / member / "pyproject.toml").read_text()


def test_the_vllm_connector_without_vllm_names_the_install() -> None:
    code = "import sys; sys.modules['vllm'] = None; import kvortex_vllm.connector"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "needs vLLM 0.15-0.33" in done.stderr and "pip install 'kvortex-vllm[vllm]'" in done.stderr
