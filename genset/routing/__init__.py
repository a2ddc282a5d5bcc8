"""Routing: which worker serves a request.

What the router service, the frontend (embedded router, or the client of a router service)
and the offline replay share; `services/router/` keeps only the service's own I/O.

- `api.py`: the `Router` protocol, `create_router`, and the one list of router modes and
  policy names (with the older spellings accepted as input);
- `core.py`: `RouterCore`, the pure, clock-injected brain (workers, index, load, policies);
- `index.py` (prefix index), `load.py` (predicted load), `policies.py` (genset's policy and
  the baselines);
- `feeds.py`: a core wired to the bus and etcd; `embedded.py`: the router in the caller's
  process; `remote.py`: the client of the `genset router` service.
"""
