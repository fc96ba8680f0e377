"""Emulated and local multi-node clusters on one machine (``ds-grace cluster``, the benchmarks, the tests).

- ``emulated_cluster``: N network namespaces ("nodes") x R ranks with a shaped link, or plain local ranks;
- ``cluster_network``: namespaces, veth pairs, bridge, tc shaping, stale-namespace cleanup;
- ``node_launchers``: one ``deepspeed --hostfile H --no_ssh --node_rank I`` launcher per node;
- ``rank_exec``: the per-rank shim keeping each rank's stdout, stderr and exit code in files.
"""
