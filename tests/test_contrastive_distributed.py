"""Cross-device negatives and GradCache under DDP: two gloo processes on CPU vs one process.

One spawn of 2 ranks (torch.multiprocessing, a free local port) serves every test here:
starting the processes costs far more than the checks. Every rank builds the same full
batch from a fixed seed, keeps its shard, and checks itself against the single-process
computation on the whole batch; each check's outcome per rank is written to a file that
the matching test reads.
"""

from __future__ import annotations

import functools
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for name, check in CHECKS.items():
            try:
                check(rank)
                result = "ok"
            except Exception:
                result = traceback.format_exc()
            with open(os.path.join(out_dir, f"{name}.rank{rank}"), "w") as f:
                f.write(result)
            dist.barrier()  # a failed check must not leave the other rank mid-collective
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("two_ranks"))
    mp.spawn(_entry, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
    return out_dir


def _assert_ok(out_dir, name):
    for rank in range(WORLD):
        with open(os.path.join(out_dir, f"{name}.rank{rank}")) as f:
            result = f.read()
        assert result == "ok", f"rank {rank}:\n{result}"


def _shards(sizes, full):
    """Row ranges of each rank for per-rank row counts ``sizes``."""
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [full[s:s + n] for s, n in zip(starts, sizes)]


# ---------------------------------------------------------------------------------------
# contrastive_loss(gather=True)
# ---------------------------------------------------------------------------------------


def _gather_worker(rank, backend):
    os.environ["GRIT_BACKEND"] = backend
    from grit_kernels import contrastive_loss

    from helpers import assert_close_reordered

    # Every output below is a chain of at most 32 additions (D, the documents, the ranks'
    # partial sums), computed by one process and by two in other orders.
    close = functools.partial(assert_close_reordered, n_terms=32)
    D = 5
    # (queries per rank, documents per rank): equal shards as in GritLM, then unequal ones.
    for Bs, group in (([2, 2], 2), ([3, 1], 3)):
        Ns = [b * group for b in Bs]
        g = torch.Generator().manual_seed(11)
        x_q = torch.randn(sum(Bs), D, generator=g)
        x_d = torch.randn(sum(Ns), D, generator=g)
        torch.manual_seed(5)
        lin = torch.nn.Linear(D, 4)  # a shared "encoder", so parameter gradients can be summed

        # One process holding the whole batch.
        loss_full = contrastive_loss(lin(x_q), lin(x_d), temperature=0.1)
        want = torch.autograd.grad(loss_full, list(lin.parameters()))
        q_leaf, d_leaf = x_q.clone().requires_grad_(), x_d.clone().requires_grad_()
        rows_full = contrastive_loss(q_leaf, d_leaf, temperature=0.1, reduction="none")
        want_dq, want_dd = torch.autograd.grad(rows_full.sum(), (q_leaf, d_leaf))

        # This rank's shard, gathered.
        q_mine, d_mine = _shards(Bs, x_q)[rank], _shards(Ns, x_d)[rank]
        loss = contrastive_loss(lin(q_mine), lin(d_mine), temperature=0.1, gather=True)
        close(loss, loss_full, name="loss")
        got = torch.autograd.grad(loss, list(lin.parameters()))
        for gp, wp in zip(got, want):
            dist.all_reduce(gp)  # summed over ranks
            close(gp, wp, name="parameter gradient")

        # Per-query losses in rank order; the local shards get their rows of the gradient.
        q_leaf, d_leaf = q_mine.clone().requires_grad_(), d_mine.clone().requires_grad_()
        rows = contrastive_loss(q_leaf, d_leaf, temperature=0.1, reduction="none", gather=True)
        close(rows, rows_full.detach(), name="rows")
        dq, dd = torch.autograd.grad(rows.sum(), (q_leaf, d_leaf))
        close(dq, _shards(Bs, want_dq)[rank], name="dq")
        close(dd, _shards(Ns, want_dd)[rank], name="dd")

    # Explicit targets index the rank's own documents and are shifted by the lower ranks'.
    x_q, x_d = torch.randn(4, D, generator=g), torch.randn(6, D, generator=g)
    local_targets = [torch.tensor([2, 0]), torch.tensor([1, 1])]
    full_targets = torch.tensor([2, 0, 3 + 1, 3 + 1])
    rows_full = contrastive_loss(x_q, x_d, targets=full_targets, temperature=0.1, reduction="none")
    rows = contrastive_loss(_shards([2, 2], x_q)[rank], _shards([3, 3], x_d)[rank], targets=local_targets[rank],
                            temperature=0.1, reduction="none", gather=True)
    close(rows, rows_full, name="rows with targets")
    try:
        contrastive_loss(x_q[:2], x_d[:3], targets=torch.tensor([0, 3]), gather=True)
    except ValueError as e:
        assert str(e).startswith("targets:"), e
    else:
        raise AssertionError("a target past the local documents was accepted")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gather_matches_single_process(two_ranks, backend):
    _assert_ok(two_ranks, f"gather_{backend}")


# ---------------------------------------------------------------------------------------
# GradCache under DDP
# ---------------------------------------------------------------------------------------


def _ddp_worker(rank):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from grit_kernels import GradCache, contrastive_loss
    from helpers import assert_close_reordered

    B, D = 4, 6  # per rank: 4 queries, 8 documents
    g = torch.Generator().manual_seed(3)
    x_q, x_d = torch.randn(WORLD * B, D, generator=g), torch.randn(WORLD * 2 * B, D, generator=g)
    q_mine, d_mine = _shards([B] * WORLD, x_q)[rank], _shards([2 * B] * WORLD, x_d)[rank]
    loss_fn = functools.partial(contrastive_loss, temperature=0.05, gather=True)

    def make():
        torch.manual_seed(0)
        return DDP(torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)))

    # Without GradCache: one DDP forward per input, one backward.
    plain = make()
    loss_fn(plain(q_mine), plain(d_mine)).backward()
    want = [p.grad.clone() for p in plain.parameters()]

    for chunks in ((1, 3), (2, 8)):
        cached = make()
        reductions = []

        def counting_hook(state, bucket):
            reductions.append(bucket.index())
            return allreduce_hook(state, bucket)

        cached.register_comm_hook(None, counting_hook)
        GradCache(cached, chunks, loss_fn).step(q_mine, d_mine)
        for p, w in zip(cached.parameters(), want):
            assert_close_reordered(p.grad, w, n_terms=64, name="gradient")  # 2 x 8 docs, 16 hidden, 2 ranks
        # no_sync on every chunk but the last: each bucket is all-reduced exactly once.
        assert len(reductions) == len(set(reductions)) > 0, reductions


def test_grad_cache_under_ddp_matches_plain_ddp(two_ranks):
    _assert_ok(two_ranks, "grad_cache_ddp")


CHECKS = {
    "gather_cpu": functools.partial(_gather_worker, backend="cpu"),
    "gather_triton": functools.partial(_gather_worker, backend="triton"),
    "grad_cache_ddp": _ddp_worker,
}
