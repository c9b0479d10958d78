"""A peer that speaks ZMTP by hand at the trainer's trajectory port (no CURVE: loopback's default, or any
host that can reach a misconfigured endpoint). One frame that announces more bytes than any trajectory
has must be refused when its header arrives, not buffered: the receiver's memory stays bounded
(docs/architecture.md invariant 5), and the receiver goes on serving honest engines."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

RECEIVER = """
import asyncio
from tidal.protocol.channels import TrajectoryReceiver
async def main():
    async with TrajectoryReceiver("tcp://127.0.0.1:0", auto_commit=True) as rx:
        print(rx.endpoint, flush=True)
        while True:
            await rx.recv()
asyncio.run(main())
"""
ANNOUNCED = 4 << 30
"""What the hostile frame claims to be: 4 GiB (a 32k-token trajectory is well under 1 MiB)."""
STREAMED = 192 << 20
"""What it actually sends of it before the test looks at the receiver's memory."""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def zmtp_dealer(port: int) -> socket.socket:
    """A raw TCP connection that has done ZMTP 3's NULL handshake as a DEALER."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\x00") + b"\x00" * 32)
    body = b"\x05READY" + bytes([11]) + b"Socket-Type" + struct.pack(">I", 6) + b"DEALER"
    s.sendall(bytes([0x04, len(body)]) + body)
    s.settimeout(10)
    got = b""
    while b"READY" not in got:
        chunk = s.recv(4096)
        assert chunk, "the receiver closed the connection during the handshake"
        got += chunk
    return s


def test_an_oversized_frame_is_refused_at_its_header():
    child = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline().strip().rsplit(":", 1)[1])
        before = rss_bytes(child.pid)
        conn = zmtp_dealer(port)
        conn.sendall(bytes([0x02]) + struct.pack(">Q", ANNOUNCED))  # a long frame's header
        sent, block = 0, b"\x00" * (1 << 20)
        try:
            while sent < STREAMED:
                conn.sendall(block)
                sent += len(block)
        except OSError:
            pass  # dropped by the receiver: what should happen
        time.sleep(0.5)  # let the receiver's I/O thread take in what is on the wire
        assert child.poll() is None, "the receiver died"
        grown = rss_bytes(child.pid) - before
        conn.close()
        assert grown < 64 << 20, f"the receiver buffered {grown >> 20} MiB of one hostile frame"
    finally:
        child.kill()
        child.wait()
