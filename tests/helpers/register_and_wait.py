"""Test helper process: register one InstanceRecord in etcd under this process's lease, print
READY, and wait. SIGTERM closes the discovery (revoking the lease) and exits 0; SIGKILL
leaves the record to expire with the lease.

usage: python tests/helpers/register_and_wait.py ETCD_ENDPOINT KEY INSTANCE_ID TTL
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import proto
from genset.runtime.discovery import Discovery
from genset.runtime.logging import configure_logging


async def main(endpoint: str, key: str, instance_id: int, ttl: float) -> int:
    configure_logging("json", "info", service="register_and_wait", instance_id=instance_id)
    discovery = await Discovery.connect(endpoint, ttl=ttl)
    record = proto.InstanceRecord(instance_id=instance_id, component="test", namespace="test",
                                  pid=os.getpid())
    await discovery.register(key, record)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    await stop.wait()
    await discovery.close(revoke=True)
    return 0


if __name__ == "__main__":
    ep, k, iid, t = sys.argv[1:5]
    raise SystemExit(asyncio.run(main(ep, k, int(iid), float(t))))
