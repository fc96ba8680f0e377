"""What the hot-path counter (benchmarks/counting.py) calls a host read: reads, data-dependent shapes and
uploads (a tensor made from host data, or a blocking copy from host memory to an accelerator), and not
device work that needs no host value."""

from __future__ import annotations

import torch

from benchmarks.counting import _synchronous_upload, count_hot_path


def test_reads_and_uploads_are_host_reads_and_device_work_is_not():
    x_T = torch.arange(6)
    with count_hot_path() as counts:
        x_T.tolist()
        x_T.nonzero()
        torch.tensor([1, 2])  # host data: a copy the host waits for on an accelerator
        x_T[2:3].zero_()  # a fill: nothing comes from the host
        torch.searchsorted(x_T, torch.arange(3), right=True)
    assert counts.host_reads == {"tolist": 1, "nonzero": 1, "upload": 1}
    assert counts.aten_ops["searchsorted"] == 1 and counts.aten_ops["zero_"] == 1


def test_blocking_copies_to_an_accelerator_are_uploads():
    host_T = torch.zeros(4)
    assert _synchronous_upload("_to_copy", (host_T,), {"device": torch.device("cuda")})
    assert _synchronous_upload("_to_copy", (host_T,), {"device": torch.device("cuda"), "non_blocking": True})
    assert not _synchronous_upload("_to_copy", (host_T,), {"device": torch.device("cpu")})
    assert not _synchronous_upload("_to_copy", (host_T,), {"dtype": torch.float64})
    assert not _synchronous_upload("copy_", (torch.zeros(4), host_T), {})  # host to host
