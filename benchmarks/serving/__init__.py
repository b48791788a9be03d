"""The online serving benchmark's parts: seeded datasets, the token counter, the streaming client,
the metrics, and the server launchers and plots of the side-by-side comparison.

`benchmarks/bench_serving.py` and `benchmarks/compare_servers.py` are the entry points; they put this
folder's parent on `sys.path`, so the package imports as `serving`.
"""
