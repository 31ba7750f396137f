# Source on the GPU box (no internet, no vLLM, our deps partly missing):
#   . tests/gpu/device_env.sh && python3 -m pytest tests/gpu && python3 -m kvortex_core.cli.app bench transfer
# Installs the carried wheels in .whl/ (pydantic & co, see docs/benchmarks/transfer.md) into
# /tmp/kvx-site and writes dist-info entry points so the built-in backends register as when installed.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kvx-site .whl/*.whl
for spec in "kvortex_core kvortex-core kvortex_core.testing.memory" \
            "kvortex_backends kvortex-backends kvortex_backends.plugin"; do
  set -- $spec
  info=/tmp/kvx-site/$1-0.1.0.dist-info
  mkdir -p "$info"
  printf 'Metadata-Version: 2.1\nName: %s\nVersion: 0.1.0\n' "$2" > "$info/METADATA"
  printf '[kvortex]\n%s = %s\n' "$2" "$3" > "$info/entry_points.txt"
done
# the checkout first: a warm machine may hold older kvortex copies installed by other runs
export PYTHONPATH=$PWD/kvortex_core/src:$PWD/kvortex_backends/src:/tmp/kvx-site
export PYTHONUNBUFFERED=1
set +e
