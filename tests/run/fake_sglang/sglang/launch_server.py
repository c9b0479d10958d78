"""A stand-in for `python -m sglang.launch_server`: never becomes ready, ignores SIGTERM, and starts a
subprocess of its own, like the real server's scheduler processes. Tests of `tidal run` use it to stop a
run while its server is still starting, and to see that SIGKILL reaches a child's subprocesses too."""

import signal
import subprocess
import sys
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
print(f"fake sglang: {' '.join(sys.argv[1:])}; worker pid {worker.pid}", flush=True)
while True:
    time.sleep(3600)
