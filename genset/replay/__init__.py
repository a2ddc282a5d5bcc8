"""`genset replay`: a trace through genset's pure cores in simulated time (no NATS, no etcd, no
sleeping). `trace.py` loads Mooncake-format traces; `simulate.py` runs the router and mocker
workers over them; `__main__.py` is the command line."""
