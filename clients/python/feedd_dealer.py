#!/usr/bin/env python3
"""feedd client in Python with pyzmq: a DEALER with a window of messages in flight.

Faster than REQ (one round trip per message) when the network has latency: up to WINDOW
messages are out at once. Each message goes out as three frames, [id, "", body]: feedd echoes
every frame before the body, so the reply comes back as [id, "", "TRUE"] and is matched to its
message by id, whatever order the replies arrive in.

- A message not answered within the timeout is resent with the same id and body (feedd is
  idempotent on the ticket, so a resend is always safe); a late reply to an earlier copy is
  simply taken as the answer, and further copies' replies are ignored.
- ZMQ_IMMEDIATE=1 only with several endpoints (comma-separated): messages are then queued
  only on connected peers; without it a DEALER keeps queueing on a dead feedd. With one
  endpoint it stays off: libzmq discards replies received but not yet read when a connection
  with IMMEDIATE drops (a feedd restarting or upgrading), which would cost resends. During
  `feedd upgrade` the messages in flight on the old connection are resent after the timeout
  and answered once by the new serving process.
- FALSE <reason> means none of that message's records is stored; resending will not help.

Usage: feedd_dealer.py ENDPOINT[,ENDPOINT...] [FILE] [--per-message N] [--window W]
                       [--timeout-ms T] [--retries R]
Exit 0: all TRUE; 1: some message got FALSE; 2: gave up or bad usage.
"""

import argparse
import sys
import time

import zmq


def batches(lines, per_message):
    """Groups non-empty lines into lists of at most per_message records."""
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
    parser = argparse.ArgumentParser(description="Send fee records to feedd over a DEALER socket.")
    parser.add_argument("endpoints", help="one or more, comma-separated, e.g. tcp://10.0.0.1:5555")
    parser.add_argument("file", nargs="?", help="records, one 'ticket,login,volume' per line (default: stdin)")
    parser.add_argument("--per-message", type=int, default=100)
    parser.add_argument("--window", type=int, default=16, help="messages in flight")
    parser.add_argument("--timeout-ms", type=int, default=2500)
    parser.add_argument("--retries", type=int, default=10)
    args = parser.parse_args()
    if min(args.per_message, args.window, args.timeout_ms) < 1 or args.retries < 0:
        parser.error("--per-message, --window and --timeout-ms must be positive")

    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    if len(endpoints) > 1:
        socket.setsockopt(zmq.IMMEDIATE, 1)
    for endpoint in endpoints:
        socket.connect(endpoint)
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN | zmq.POLLOUT)
    timeout = args.timeout_ms / 1000

    with (open(args.file) if args.file else sys.stdin) as lines:
        messages = ["\n".join(b).encode() for b in batches(lines, args.per_message)]
    pending = {}  # id -> (deadline, attempts)
    next_id = answered = refused = records = 0
    # With no feedd connected at all nothing can be sent: give up after as long as the retries.
    patience = timeout * (args.retries + 1)
    last_progress = time.monotonic()
    while answered < len(messages):
        # Fill the window while the socket can take a message without blocking.
        while next_id < len(messages) and len(pending) < args.window:
            try:
                socket.send_multipart([str(next_id).encode(), b"", messages[next_id]], zmq.NOBLOCK)
            except zmq.Again:
                break  # no peer connected yet: wait for one
            pending[next_id] = (time.monotonic() + timeout, 1)
            next_id += 1
            last_progress = time.monotonic()
        events = dict(poller.poll(50))
        if events.get(socket, 0) & zmq.POLLIN:
            while True:
                try:
                    frames = socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                mid = int(frames[0])
                if pending.pop(mid, None) is None:
                    continue  # the reply to a resent copy that was already answered
                answered += 1
                last_progress = time.monotonic()
                records += messages[mid].count(b"\n") + 1
                reply = frames[-1].decode()
                if reply != "TRUE":
                    refused += 1
                    print(f"{reply} (message {mid})", file=sys.stderr)
        now = time.monotonic()
        if not pending and now - last_progress > patience:
            print(f"gave up: no feedd reachable for {patience:.1f} s", file=sys.stderr)
            return 2
        for mid, (deadline, attempts) in list(pending.items()):
            if now < deadline:
                continue
            if attempts > args.retries:
                print(f"gave up: message {mid} unanswered after {attempts} attempts", file=sys.stderr)
                return 2
            try:
                socket.send_multipart([str(mid).encode(), b"", messages[mid]], zmq.NOBLOCK)
            except zmq.Again:
                pass  # no peer right now; tried again at the next deadline
            pending[mid] = (now + timeout, attempts + 1)
    print(f"{records} records sent, {refused} messages refused")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
