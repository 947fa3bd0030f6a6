"""Drives py-consul (PyPI), a Consul client nobody here wrote, against a
Trellis registry. Prints one JSON line per step on stdout; the Rust test
(tests/tests/consul_clients.rs) reads them and acts between the steps.

    python3 py_consul_client.py HOST PORT
"""
import json
import sys
import time

import consul


def say(step, **fields):
    print(json.dumps({"step": step, **fields}), flush=True)


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    c = consul.Consul(host=host, port=port)

    index, services = c.catalog.services()
    say("catalog", index=index, services=services)

    index, nodes = c.health.service("users", passing=True)
    say("passing", index=index, ids=sorted(n["Service"]["ID"] for n in nodes),
        checks=sorted(ch["Status"] for n in nodes for ch in n["Checks"]))

    index, nodes = c.health.service("users", tag="v2")
    say("tagged", index=index, ids=sorted(n["Service"]["ID"] for n in nodes))

    index, checks = c.health.state("any")
    _, critical = c.health.state("critical")
    say("states", index=index, any=sorted(ch["CheckID"] for ch in checks),
        statuses=sorted(ch["Status"] for ch in checks), critical=[ch["CheckID"] for ch in critical])

    index, nodes = c.health.service("orders")
    say("holding", index=index, ids=[n["Service"]["ID"] for n in nodes])
    started = time.monotonic()
    index2, nodes = c.health.service("orders", index=index, wait="60s")
    say("changed", index=index2, held_ms=int((time.monotonic() - started) * 1000),
        ids=[n["Service"]["ID"] for n in nodes],
        ports=[n["Service"]["Port"] for n in nodes])


if __name__ == "__main__":
    main()
