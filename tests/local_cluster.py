"""A 2-node Ray cluster on this machine, driven through stdin: `python tests/local_cluster.py`.

Run as its own process because a test process already holds its own `ray.init`. It starts a
head and one worker node (`--cpus` each, `ray.cluster_utils.Cluster`), prints one JSON line
`{"address": ...}`, then obeys one command per line and answers each with a JSON line:

  remove   kill the worker node's processes at once, as when a machine dies
  add      start a new worker node (the lost one's replacement)
  stop     shut the cluster down and exit (end of input does the same)

The node processes share this process's fate (Ray's reaper), so killing it also ends them.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from ray.cluster_utils import Cluster


def say(**message) -> None:
    print(json.dumps(message), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpus", type=int, default=3)
    args = parser.parse_args()
    node_args = {
        "num_cpus": args.cpus,
        "object_store_memory": 300 * 1024 * 1024,
        "include_dashboard": False,
    }
    cluster = Cluster(initialize_head=True, head_node_args=node_args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the `finally` below
    try:
        worker = cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        say(address=cluster.address)
        for line in sys.stdin:
            command = line.strip()
            if command == "remove":
                cluster.remove_node(worker, allow_graceful=False)
                say(removed=worker.node_id)
            elif command == "add":
                worker = cluster.add_node(**node_args)
                say(added=worker.node_id)
            elif command == "stop":
                break
            else:
                say(error=f"unknown command {command!r}")
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
