#!/usr/bin/env bash
# Install vLLM VERSION for the CPU connector tests.
#
#   scripts/install-vllm.sh 0.33.0                  # into $PYTHON's environment (default: the
#                                                   # checkout's .venv, else python3's)
#   scripts/install-vllm.sh 0.15.1 .venv-vllm015    # into a new venv layered over that environment
#
# With a venv directory, the new venv sees everything of the base environment (torch, the
# KVortex packages, pytest, redis, ...) through a .pth file, while vLLM and its pins live only
# in the new venv: nothing of the base environment changes and no torch is downloaded again.
#
# The PyPI wheel is a CUDA build that pins a CUDA torch; installing it normally would pull
# gigabytes of CUDA wheels. So: vLLM itself with --no-deps, then only the pure-Python
# requirements its scheduler/config/connector imports need, with the version pins this vLLM
# declares (read from its own metadata), xgrammar with --no-deps, and the test-only platform
# plugin that makes vLLM pick its CPU platform. The CPU torch already installed is kept.
# Use a separate venv: vLLM's pins (transformers, ...) may differ from the project's.
set -euo pipefail

VERSION="${1:?usage: scripts/install-vllm.sh VERSION [VENV_DIR] (e.g. 0.33.0 .venv-vllm)}"
VENV="${2:-}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# $PYTHON, else the checkout's .venv (what scripts/setup made), else python3 on PATH
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -x "$HERE/.venv/bin/python" ]; then
  PY="$HERE/.venv/bin/python"
else
  PY="$(command -v python3 || command -v python || echo python3)"
fi

if [ -n "$VENV" ]; then
  BASE_SITE="$("$PY" -c 'import site; print(site.getsitepackages()[0])')"
  "$PY" -m venv --without-pip "$VENV" 2>/dev/null || "$PY" -m venv "$VENV"
  NEW_SITE="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
  # addsitedir also runs the base environment's own .pth files (editable installs).
  echo "import site; site.addsitedir('$BASE_SITE')" > "$NEW_SITE/zz_kvortex_base_env.pth"
  PY="$VENV/bin/python"
  "$PY" -m pip --version >/dev/null 2>&1 || { echo "install-vllm: no pip in $VENV" >&2; exit 1; }
fi
# pip with retries: the vLLM wheels are hundreds of MB and a download cut midway (seen on CI:
# urllib3 read errors) should cost a retry, not the run. pip retries connections itself
# (--retries); a download that breaks after it started is retried here, whole.
pip_install() {
  local attempt
  for attempt in 1 2 3 4; do
    if "$PY" -m pip install --quiet --disable-pip-version-check --retries 10 --timeout 60 "$@" \
      2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); then
      return 0
    fi
    [ "$attempt" -lt 4 ] || break
    echo "install-vllm: pip install $* failed (attempt $attempt of 4); retrying in $((attempt * 20)) s" >&2
    sleep $((attempt * 20))
  done
  echo "install-vllm: pip install $* failed 4 times" >&2
  return 1
}
PIP=(pip_install)

"$PY" -c "import torch" 2>/dev/null || {
  echo "install-vllm: torch is not installed in $PY; run scripts/setup first (it installs the CPU build, torch==2.13.0 or \$KVORTEX_TORCH_SPEC; a plain 'pip install torch' is a CUDA build of several GB)" >&2
  exit 1
}

"${PIP[@]}" --no-deps "vllm==${VERSION}"

# Pure-Python packages the imports need (names only; pins come from vLLM's metadata).
ALLOW="regex cachetools psutil sentencepiece numpy requests tqdm blake3 py-cpuinfo transformers
tokenizers protobuf aiohttp openai pydantic prometheus-client pillow partial-json-parser pyzmq
msgspec gguf pyyaml einops cloudpickle pybase64 cbor2 ijson setproctitle openai-harmony fastapi
llguidance filelock typing-extensions watchfiles python-json-logger uvloop diskcache lark
safetensors huggingface-hub mistral-common tiktoken jsonschema oss-harmony"

mapfile -t REQS < <("$PY" - "$ALLOW" <<'EOF'
import importlib.metadata as md
import re
import sys

allow = {n.lower() for n in sys.argv[1].split()}
for req in md.requires("vllm") or []:
    if "extra ==" in req:
        continue
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower().replace("_", "-")
    if name in allow:
        name_part, _, marker = req.partition(";")  # keep environment markers: pip evaluates them
        print(re.sub(r"\[.*?\]", "", name_part).replace(" ", "") + (";" + marker if marker else ""))
EOF
)
# Needed by some versions' imports but not always declared.
# apache-tvm-ffi: imported by xgrammar, which is installed with --no-deps below.
"${PIP[@]}" "${REQS[@]}" uvloop huggingface-hub safetensors apache-tvm-ffi

XGR="$("$PY" - <<'EOF'
import importlib.metadata as md
print(next((r.split(";")[0].replace(" ", "") for r in md.requires("vllm") or [] if r.startswith("xgrammar")), "xgrammar"))
EOF
)"
"${PIP[@]}" --no-deps "$XGR"
"${PIP[@]}" --no-deps -e "$HERE/tests/vllm_cpu_platform"

"$PY" - <<'EOF'
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import vllm
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: F401
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1  # noqa: F401
from vllm.platforms import current_platform
print(f"install-vllm: vLLM {vllm.__version__} imports; platform {type(current_platform).__name__}")
EOF
