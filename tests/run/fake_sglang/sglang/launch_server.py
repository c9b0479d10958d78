"""A stand-in for `python -m sglang.launch_server` in tests of `tidal run` (no GPU here).

With `--fake-hang` it never becomes ready, ignores SIGTERM and starts a subprocess of its own, like
the real server's scheduler processes: tests stop a run while its server is still starting, and see
that SIGKILL reaches a child's subprocesses too. Otherwise it becomes `tidal serve` (the CPU reference
server speaks the same HTTP API) with the arguments tidal run gives SGLang: --model-path, --host,
--port and --weight-version.
"""

import argparse
import os
import signal
import subprocess
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--model-path", required=True)
parser.add_argument("--host", required=True)
parser.add_argument("--port", required=True)
parser.add_argument("--weight-version")
parser.add_argument("--fake-hang", action="store_true")
args, rest = parser.parse_known_args()
print(f"fake sglang: {' '.join(sys.argv[1:])}", flush=True)
if not args.fake_hang:
    argv = [sys.executable, "-m", "tidal", "serve", "--model", args.model_path, "--host", args.host,
            "--port", args.port, *(["--weight-version", args.weight_version] if args.weight_version else [])]
    os.execv(sys.executable, argv + rest)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
print(f"worker pid {worker.pid}", flush=True)
while True:
    time.sleep(3600)
