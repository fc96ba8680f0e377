"""Collective probe run by every rank under the deepspeed launcher (emulated cluster or local ranks).

Phases, all with ``all_to_all_single`` over gloo:
1. pairwise throughput (``--pairwise-bytes``): messages to the next rank of the same node ("intra"),
   from node 0 to node 1 ("inter_oneway") and from every node to the next ("inter_duplex");
   the slowest rank's time in the fastest repeat gives the rate;
2. uneven all-to-all: a fixed, rank-dependent split matrix, checked for correctness and timed.

Prints one JSON line per rank on stdout: the results, or the failure that stopped it (a rank that
fails on purpose prints one line for that first).
Failure injection (``--fail-rank``) makes one rank exit, die by SIGKILL or hang after some
iterations of phase 2, so that the reliability of the launch path can be tested: the other ranks
then fail their collective (peer gone, or ``--collective-timeout-s`` reached) and say so.

Shape suffixes: R ranks (world size), N nodes, G ranks per node; counts_RR[src][dst] in elements.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

from ds_grace.cluster.emulated_cluster import declared_topology

BYTES_PER_ELEMENT = 4  # float32 payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", type=int, default=None, help="passed by the deepspeed launcher")
    parser.add_argument("--iterations", type=int, default=5, help="timed uneven all-to-all iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed uneven all-to-all iterations")
    parser.add_argument(
        "--bytes-per-peer", type=int, default=64 * 1024, help="mean bytes one rank sends one peer (phase 2)"
    )
    parser.add_argument(
        "--pairwise-bytes", type=int, default=0, help="bytes per rank for the throughput phase (0: skip)"
    )
    parser.add_argument("--pairwise-repeats", type=int, default=5)
    parser.add_argument("--collective-timeout-s", type=float, default=30.0, help="gloo collective timeout")
    parser.add_argument("--fail-rank", type=int, default=-1, help="rank that fails on purpose (-1: none)")
    parser.add_argument("--fail-after", type=int, default=2, help="phase-2 iterations before it fails")
    parser.add_argument("--fail-mode", choices=("exit", "kill", "hang"), default="kill")
    args = parser.parse_args(argv)
    for name in ("iterations", "bytes_per_peer", "pairwise_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup ({args.warmup}) must be >= 0")
    if args.collective_timeout_s <= 0:
        parser.error(f"--collective-timeout-s ({args.collective_timeout_s}) must be > 0")
    return args


def uneven_counts(world_size: int, mean_elements: int) -> list[list[int]]:
    """counts_RR[src][dst]: deterministic, uneven (0.28x to 1.72x the mean), identical on every rank."""
    weights = (2, 5, 3, 6, 1, 4)  # mean 3.5
    return [
        [
            max(1, mean_elements * weights[(7 * src + 3 * dst) % len(weights)] * 2 // 7)
            for dst in range(world_size)
        ]
        for src in range(world_size)
    ]


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, sort_keys=True), flush=True)


class Probe:
    def __init__(self, args: argparse.Namespace) -> None:
        import deepspeed
        import torch
        import torch.distributed as dist

        self.args = args
        self.torch = torch
        self.dist = dist
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        topology = declared_topology()
        if topology.world_size != self.world_size:
            raise ValueError(f"declared topology {topology} does not match WORLD_SIZE ({self.world_size})")
        self.num_nodes = topology.num_nodes
        self.ranks_per_node = topology.gpus_per_node
        self.node = self.rank // self.ranks_per_node
        self.local_rank = self.rank % self.ranks_per_node
        self.phase = "init"
        self.iteration = -1
        torch.set_num_threads(1)
        deepspeed.init_distributed(
            dist_backend="gloo", timeout=timedelta(seconds=args.collective_timeout_s), verbose=False
        )

    def identity(self) -> dict[str, Any]:
        return {
            "probe": "collectives",
            "rank": self.rank,
            "node": self.node,
            "local_rank": self.local_rank,
            "world_size": self.world_size,
            "nodes": self.num_nodes,
            "ranks_per_node": self.ranks_per_node,
            "pid": os.getpid(),
        }

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def _exchange(self, send_counts: list[int], recv_counts: list[int], fill: float) -> Any:
        torch = self.torch
        send = torch.full((sum(send_counts),), fill, dtype=torch.float32)
        recv = torch.empty(sum(recv_counts), dtype=torch.float32)
        self.dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts)
        return recv

    def _max_over_ranks(self, value: float) -> float:
        tensor = self.torch.tensor([value], dtype=self.torch.float64)
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.MAX)
        return float(tensor.item())

    def pairwise(self, kind: str) -> dict[str, Any]:
        """Every sending rank sends `--pairwise-bytes` to one partner; returns the slowest rank's rate.

        The rate is taken from the fastest repeat: a TCP loss on the shaped link costs a retransmit
        timeout (seen: 0.84 s repeats with single 1.05-1.10 s ones at 20 Mbit/s), and such stalls
        only ever slow a repeat down, so the fastest one is the link's capacity.

        intra: to the next rank of the same node; inter_oneway: node 0's ranks to their peers on
        node 1 (one direction: the link rate); inter_duplex: every node to the next node's peers
        (both directions at once, as an all-to-all loads a link).
        """
        nodes, per_node, node, local = self.num_nodes, self.ranks_per_node, self.node, self.local_rank
        send_to = recv_from = None
        if kind == "intra":
            send_to = node * per_node + (local + 1) % per_node
            recv_from = node * per_node + (local - 1) % per_node
        elif kind == "inter_oneway":
            send_to = per_node + local if node == 0 else None
            recv_from = local if node == 1 else None
        else:
            send_to = ((node + 1) % nodes) * per_node + local
            recv_from = ((node - 1) % nodes) * per_node + local
        elements = max(1, self.args.pairwise_bytes // BYTES_PER_ELEMENT)
        send_counts = [elements if r == send_to else 0 for r in range(self.world_size)]
        recv_counts = [elements if r == recv_from else 0 for r in range(self.world_size)]
        seconds = []
        for _ in range(self.args.pairwise_repeats):
            self.dist.barrier()
            start = time.perf_counter()
            self._exchange(send_counts, recv_counts, fill=float(self.rank))
            seconds.append(self._max_over_ranks(time.perf_counter() - start))
        best_s = min(seconds)
        bytes_per_rank = elements * BYTES_PER_ELEMENT
        record: dict[str, Any] = {
            "bytes_per_rank": bytes_per_rank,
            "seconds": seconds,
            "median_s": statistics.median(seconds),
            "best_s": best_s,
        }
        if kind == "intra":
            record["rank_mbit_s"] = bytes_per_rank * 8 / best_s / 1e6
        else:
            # all ranks of a node share its one link: per_node messages cross it in each loaded direction
            record["node_link_mbit_s"] = per_node * bytes_per_rank * 8 / best_s / 1e6
        return record

    def maybe_fail(self, iteration: int) -> None:
        args = self.args
        if self.rank != args.fail_rank or iteration != args.fail_after:
            return
        emit({**self.identity(), "status": "injected_failure", "mode": args.fail_mode, "time": time.time()})
        print(
            f"probe rank {self.rank}: failing on purpose ({args.fail_mode}) at iteration {iteration}",
            file=sys.stderr,
            flush=True,
        )
        if args.fail_mode == "exit":
            os._exit(17)
        if args.fail_mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # hang: stay alive without taking part in any collective
            time.sleep(1)

    def uneven(self) -> dict[str, Any]:
        args = self.args
        counts_RR = uneven_counts(self.world_size, max(1, args.bytes_per_peer // BYTES_PER_ELEMENT))
        send_counts = counts_RR[self.rank]
        recv_counts = [counts_RR[src][self.rank] for src in range(self.world_size)]
        expected = self.torch.cat(
            [
                self.torch.full((recv_counts[src],), float(src), dtype=self.torch.float32)
                for src in range(self.world_size)
            ]
        )
        seconds: list[float] = []
        correct = True
        for iteration in range(args.warmup + args.iterations):
            self.iteration = iteration
            self.maybe_fail(iteration)
            self.dist.barrier()
            start = time.perf_counter()
            recv = self._exchange(send_counts, recv_counts, fill=float(self.rank))
            elapsed = time.perf_counter() - start
            correct = correct and bool(self.torch.equal(recv, expected))
            if iteration >= args.warmup:
                seconds.append(elapsed)
        seconds_sorted = sorted(seconds)
        bytes_by_kind = {"self": 0, "intra": 0, "inter": 0}
        for dst, count in enumerate(send_counts):
            kind = "self" if dst == self.rank else "intra" if self.node_of(dst) == self.node else "inter"
            bytes_by_kind[kind] += count * BYTES_PER_ELEMENT
        return {
            "iterations": len(seconds),
            "median_s": statistics.median(seconds),
            "p90_s": seconds_sorted[min(len(seconds) - 1, int(0.9 * len(seconds)))],
            "send_bytes": bytes_by_kind,
            "recv_bytes": sum(recv_counts) * BYTES_PER_ELEMENT,
            "correct": correct,
        }

    def run(self) -> dict[str, Any]:
        result: dict[str, Any] = {**self.identity(), "status": "ok"}
        if self.args.pairwise_bytes > 0:
            self.phase = "pairwise"
            result["pairwise"] = {}
            if self.ranks_per_node > 1:
                result["pairwise"]["intra"] = self.pairwise("intra")
            if self.num_nodes > 1:
                result["pairwise"]["inter_oneway"] = self.pairwise("inter_oneway")
                result["pairwise"]["inter_duplex"] = self.pairwise("inter_duplex")
        self.phase = "all_to_all_single"
        result["uneven_all_to_all"] = self.uneven()
        self.phase = "done"
        self.dist.barrier()
        return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    probe: Probe | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        for repeated in (signal.SIGTERM, signal.SIGINT):  # the launcher and rank_exec.py may both send one
            signal.signal(repeated, signal.SIG_IGN)
        where = f" during {probe.phase} (iteration {probe.iteration})" if probe else ""
        rank = os.environ.get("RANK", "?")
        message = (
            f"probe rank {rank}: stopped by signal {signal.Signals(signum).name}{where}; the deepspeed "
            "launcher stops every rank of a node once one of them fails"
        )
        emit(
            {
                "probe": "collectives",
                "rank": int(rank) if rank.isdigit() else rank,
                "status": "terminated",
                "signal": signal.Signals(signum).name,
                "message": message,
                "time": time.time(),
            }
        )
        print(message, file=sys.stderr, flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        probe = Probe(args)
        result = probe.run()
    except Exception as exc:  # noqa: BLE001 - every failure becomes the rank's one JSON line
        rank = os.environ.get("RANK", "?")
        where = f"{probe.phase} (iteration {probe.iteration})" if probe else "init"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        message = (
            f"probe rank {rank}: collective failed during {where} after {time.time() - started:.1f} s "
            f"(collective timeout {args.collective_timeout_s:g} s): {type(exc).__name__}: {first_line}"
        )
        emit(
            {
                "probe": "collectives",
                "rank": int(rank) if rank.isdigit() else rank,
                "status": "failed",
                "phase": where,
                "error": first_line,
                "message": message,
                "time": time.time(),
            }
        )
        print(message, file=sys.stderr, flush=True)
        # skip interpreter finalisation: tearing down a broken gloo group can block
        os._exit(3)
    result["wall_s"] = time.time() - started
    emit(result)
    try:
        probe.dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - shutdown noise must not fail a finished probe
        pass
    return 0


if __name__ == "__main__":
    code = main()
    from ds_grace.comm.collectives import end_process

    end_process(code)  # a rank: past the interpreter's teardown (see ds_grace.comm.collectives)
