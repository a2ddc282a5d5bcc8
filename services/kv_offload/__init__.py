"""The KV offload store service (`genset offload`): RAM and disk tiers of evicted KV blocks
that any worker can onboard instead of recomputing. The policy lives in `genset.offload`;
this package holds the store's own I/O: files (`disk`), block bytes (`store`), NATS
(`service`)."""
