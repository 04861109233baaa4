"""``python -m hlsim``: the simulator as a process."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from .server import SimulatorServer
from .simulator import Simulator

# --------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hlsim", description="Loopback Hyperliquid simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--url-file", help="write the base URL here once listening")
    parser.add_argument("--state", help="JSON state to load at start (Simulator.load format)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every /info and /exchange")
    args = parser.parse_args(argv)

    sim = Simulator()
    if args.state:
        sim.load_file(args.state)
    server = SimulatorServer(sim, args.host, args.port, latency_ms=args.latency_ms).start()
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.url_file:
        tmp = f"{args.url_file}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(server.url + "\n")
        os.replace(tmp, args.url_file)
    print(f"hyperliquid simulator listening on {server.url}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0
