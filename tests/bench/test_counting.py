"""What the hot-path counter (benchmarks/counting.py) calls a host read: reads, data-dependent shapes,
bincount and uploads (a tensor made from host data, or a blocking copy from host memory to an
accelerator), and not device work that needs no host value (value_counts, bincount's replacement)."""

from __future__ import annotations

import torch

from benchmarks.counting import _synchronous_upload, count_hot_path


def test_reads_and_uploads_are_host_reads_and_device_work_is_not():
    x_T = torch.arange(6)
    with count_hot_path() as counts:
        x_T.tolist()
        x_T.nonzero()
        torch.tensor([1, 2])  # host data: a copy the host waits for on an accelerator
        x_T[x_T > 2]  # a boolean mask: its nonzero runs inside the op
        x_T[2:3].zero_()  # a fill: nothing comes from the host
        torch.searchsorted(x_T, torch.arange(3), right=True)
    assert counts.host_reads == {"tolist": 1, "nonzero": 1, "upload": 1, "boolean mask index": 1}
    assert counts.aten_ops["searchsorted"] == 1 and counts.aten_ops["zero_"] == 1


def test_blocking_copies_to_an_accelerator_are_uploads():
    host_T = torch.zeros(4)
    assert _synchronous_upload("_to_copy", (host_T,), {"device": torch.device("cuda")})
    assert _synchronous_upload("_to_copy", (host_T,), {"device": torch.device("cuda"), "non_blocking": True})
    assert not _synchronous_upload("_to_copy", (host_T,), {"device": torch.device("cpu")})
    assert not _synchronous_upload("_to_copy", (host_T,), {"dtype": torch.float64})
    assert not _synchronous_upload("copy_", (torch.zeros(4), host_T), {})  # host to host


def test_value_counts_equal_bincount_without_a_host_read():
    from ds_grace.comm.schedule import value_counts

    codes_TK = torch.tensor([[3, 0], [1, 3], [3, 5]], dtype=torch.int32)
    with count_hot_path() as counts:
        counts_L = value_counts(codes_TK, 7)
    assert counts.num_host_reads == 0
    assert counts_L.dtype == torch.int64
    assert counts_L.tolist() == torch.bincount(codes_TK.reshape(-1).long(), minlength=7).tolist()
    assert value_counts(torch.zeros(0, 2, dtype=torch.long), 3).tolist() == [0, 0, 0]
    with count_hot_path() as counts:
        torch.bincount(codes_TK.reshape(-1), minlength=7)
    assert counts.host_reads == {"bincount": 1}  # CUDA's reads min and max back even with minlength
