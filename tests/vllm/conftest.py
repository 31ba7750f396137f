"""Make the harness modules beside this file importable (pytest runs with --import-mode=importlib).

The ``vllm`` marker's skip when vLLM is missing lives in the root ``tests/conftest.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)
