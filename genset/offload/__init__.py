"""The KV offload store's shared parts: tier policy, per-tier events, placement, client.

- `tiers`: RAM and disk tiers as sized LRUs with frequency-aware admission (pure, no I/O;
  the same policy in blocks for the replay);
- `events`: one tier's KvEvent log, numbered batches and snapshots split to fit a message;
- `placement`: rendezvous hashing of block hashes over store instances;
- `onboard`: how much of a store run to onboard when its copy runs beside the compute
  (pure; the hook, the replay and the genset routing policy use it);
- `client`: what a worker uses (write-behind put, deadline-bounded lookup).

`services/kv_offload` is the store process (disk files, NATS handlers); these modules never
import it.
"""
