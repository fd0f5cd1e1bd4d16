"""Start the example workload on every wash host of a lattice, as wasmCloud's operator would:
wait for the hosts' heartbeats on the scheduler NATS, then send each a `workload.start`
request (wasmCloud's runtime v2 API, JSON) and check that it runs.

Usage: start_workload.py NATS_URL IMAGE HOSTS MODEL
"""

import asyncio
import json
import sys

import nats


async def main(url: str, image: str, hosts: int, model: str) -> None:
    nc = await nats.connect(url)
    beats = await nc.subscribe("runtime.operator.heartbeat.*")
    await nc.flush()
    # Hosts started after this line see their first heartbeat counted at once (a host sends
    # one when it starts, then one every little while).
    print(f"waiting for {hosts} hosts", flush=True)
    ids: set[str] = set()
    while len(ids) < hosts:
        msg = await beats.next_msg(timeout=60)
        ids.add(json.loads(msg.data)["id"])
    for i, host in enumerate(sorted(ids)):
        start = {
            "workloadId": f"realm-ask-{i}",
            "workload": {
                "namespace": "default",
                "name": "realm-ask",
                "witWorld": {
                    "components": [{
                        "name": "ask",
                        "image": image,
                        "localResources": {"environment": {"REALM_MODEL": model}},
                    }],
                    "hostInterfaces": [
                        {"namespace": "wasi", "package": "http", "version": "0.2.0",
                         "interfaces": ["incoming-handler"], "config": {"host": "realm-ask"}},
                        {"namespace": "wasmcloud", "package": "messaging", "version": "0.2.0",
                         "interfaces": ["consumer"]},
                    ],
                },
            },
        }
        reply = await nc.request(f"runtime.host.{host}.workload.start",
                                 json.dumps(start).encode(), timeout=120)
        status = json.loads(reply.data)["workloadStatus"]
        if status["workloadState"] != "WORKLOAD_STATE_RUNNING":
            sys.exit(f"host {host}: {status}")
        print(f"workload realm-ask-{i} running on host {host}")
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
