#!/usr/bin/env python3
"""feedd client in Python with pyzmq (Debian: apt install python3-zmq; or pip install pyzmq).

A REQ socket, one message in flight. Copy it and keep the three rules it shows:

1. Wait for the reply with a timeout (RCVTIMEO); never block forever.
2. On a timeout, close the REQ socket and open a fresh one: a REQ that sent and got no reply
   cannot send again (its state machine is stuck waiting).
3. Resend the same message, unchanged. feedd is idempotent on the ticket: a record already
   stored with the same login and volume is answered TRUE again and stored once.

TRUE means every record of the message is committed. FALSE <reason> means none of them is
stored (malformed, too large, or a ticket stored with other values): resending will not help.

Usage: feedd_req.py ENDPOINT [FILE] [--per-message N] [--timeout-ms T] [--retries R]
Reads records "ticket,login,volume", one per line, from FILE (or stdin). Exit 0: all TRUE;
1: some message got FALSE; 2: gave up (no reply after the retries) or bad usage.
"""

import argparse
import sys

import zmq


def connect(context, endpoint, timeout_ms):
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)  # closing never waits for a message we gave up on
    socket.setsockopt(zmq.RCVTIMEO, timeout_ms)
    socket.setsockopt(zmq.SNDTIMEO, timeout_ms)
    socket.connect(endpoint)
    return socket


class Client:
    def __init__(self, endpoint, timeout_ms, retries):
        self.context = zmq.Context.instance()
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.socket = connect(self.context, endpoint, timeout_ms)

    def ask(self, body):
        """Sends one message until it is answered: the reply text, or None after the retries."""
        for _ in range(self.retries + 1):
            try:
                self.socket.send(body)
                return self.socket.recv().decode()
            except zmq.Again:
                print(f"no reply within {self.timeout_ms} ms, resending on a fresh socket",
                      file=sys.stderr)
                self.socket.close()
                self.socket = connect(self.context, self.endpoint, self.timeout_ms)
        return None


def batches(lines, per_message):
    batch = []
    for line in lines:
        line = line.strip()
        if line:
            batch.append(line)
        if len(batch) == per_message:
            yield batch
            batch = []
    if batch:
        yield batch


def main():
    parser = argparse.ArgumentParser(description="Send fee records to feedd over a REQ socket.")
    parser.add_argument("endpoint", help="e.g. tcp://127.0.0.1:5555")
    parser.add_argument("file", nargs="?", help="records, one 'ticket,login,volume' per line (default: stdin)")
    parser.add_argument("--per-message", type=int, default=100)
    parser.add_argument("--timeout-ms", type=int, default=2500)
    parser.add_argument("--retries", type=int, default=10)
    args = parser.parse_args()
    if args.per_message < 1 or args.timeout_ms < 1 or args.retries < 0:
        parser.error("--per-message and --timeout-ms must be positive, --retries not negative")

    client = Client(args.endpoint, args.timeout_ms, args.retries)
    sent = refused = 0
    with (open(args.file) if args.file else sys.stdin) as lines:
        for batch in batches(lines, args.per_message):
            reply = client.ask("\n".join(batch).encode())
            if reply is None:
                print(f"gave up: no reply after {args.retries + 1} attempts", file=sys.stderr)
                return 2
            if reply != "TRUE":
                # Rejected whole: none of these records is stored.
                refused += 1
                print(f"{reply} (message starting with ticket {batch[0].split(',')[0]})",
                      file=sys.stderr)
            sent += len(batch)
    print(f"{sent} records sent, {refused} messages refused")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
