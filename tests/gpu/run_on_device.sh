#!/usr/bin/env bash
# The GPU validation run (for the `run` tool's device machine, from the repository root):
#   bash tests/gpu/run_on_device.sh            with .whl/ carried: msgspec, pyzmq, tomli-w, pytest-asyncio
#   (the image lacks them; pip download --python-version 3.12 ...) and tidal's own wheel
#   (pip wheel --no-deps --no-build-isolation -w .whl .)
# Installs the carried wheels where tidal or a package is missing, prints what the machine has, then runs
# the GPU tests and the trainer and reference-server suites (which pick the GPU by themselves: device
# "auto"), logging to $OUT/log.
# No -x: one device run should report every failure. Verbose, so a log cut short still names each
# test's outcome; pytest is interrupted (SIGINT: it still prints its summary) after $BUDGET_S seconds.
# On the H100 the whole set took longer than one 400 s call: pass paths (and options) to run a part.
# Locally: PYTHON=.venv/bin/python OUT=/tmp/out bash tests/gpu/run_on_device.sh
set -o pipefail
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/tidal-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN} TOKENIZERS_PARALLELISM=false
# The image's own pytest plugins may not fit the carried pytest: load only the ones the suite uses.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
# tidal itself travels as a wheel too (its folders install under the one name tidal.*): the carried
# packages go first on the path, the repository after them for `tests.*`.
if ! "$PYTHON" -c "import tidal.engine, msgspec, zmq, tomli_w, pytest_asyncio" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
[ $# -eq 0 ] && set -- tests/gpu tests/engine/reference tests/trainer     # else: paths and options to run
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
    "$PYTHON" - <<'PY'
import msgspec, torch, transformers, zmq
print(f"torch {torch.__version__} cuda {torch.version.cuda} available={torch.cuda.is_available()} "
      f"gpus={torch.cuda.device_count()} nccl={torch.cuda.nccl.version() if torch.cuda.is_available() else None}")
print(f"transformers {transformers.__version__} msgspec {msgspec.__version__} pyzmq {zmq.__version__}")
PY
    timeout -s INT "${BUDGET_S:-370}" "$PYTHON" -m pytest -v --tb=short --timeout 120 -p no:cacheprovider \
        -p pytest_asyncio.plugin -p pytest_timeout -p hypothesis.extra.pytestplugin --durations=12 -rfEs \
        "$@"
} 2>&1 | tee "$OUT/log"
