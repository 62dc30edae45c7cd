"""Worker processes sharing a node's proxy sockets (`--workers`): see docs/ARCHITECTURE.md.

- frames.py: the small length-prefixed JSON messages parent and workers exchange over pipes
- child.py: a worker process (`python -m safesquid_tw.workers`): only the ProxyFactory
- pool.py: the parent's side: binds the sockets, spawns, feeds policy, restarts, drains, stops
"""
