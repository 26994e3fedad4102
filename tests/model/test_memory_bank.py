import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainer.model.memory_bank import (
    MemoryBank,
    StalenessProbe,
    dedup_join,
    dedup_join_reference,
    dedup_mean,
)


def _bank() -> MemoryBank:
    torch.manual_seed(0)
    return MemoryBank(num_items=6, d=3)


def test_write_then_read_returns_vectors_and_zeros_for_never_written_and_padding():
    bank = _bank()
    v = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    bank.write(torch.tensor([1, 2]), v, step=5)
    out = bank.read(torch.tensor([[2, 1], [0, 3]]))
    assert torch.equal(out[0, 0], v[1]) and torch.equal(out[0, 1], v[0])
    assert torch.equal(out[1, 0], torch.zeros(3))
    assert torch.equal(out[1, 1], torch.zeros(3))
    assert bank.written_step.tolist() == [-1, 5, 5, -1, -1, -1, -1]
    assert bank.present.tolist() == [False, True, True, False, False, False, False]


def test_overwrite_replaces_vectors_and_steps():
    bank = _bank()
    bank.write(torch.tensor([1, 2]), torch.ones(2, 3), step=1)
    new1, new4 = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([5.0, 5.0, 5.0])
    bank.write(torch.tensor([1, 4]), torch.stack([new1, new4]), step=2)
    assert torch.equal(bank.vectors[1], new1) and torch.equal(bank.vectors[4], new4)
    assert bank.written_step.tolist() == [-1, 2, 1, -1, 2, -1, -1]


def test_probe_reports_staleness_by_hand_and_ignores_new_ids():
    probe = StalenessProbe(num_items=40, d=3)
    assert probe.stride == 8
    old8, old16 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    first = probe.update(torch.tensor([8, 16]), torch.stack([old8, old16]))
    assert math.isnan(first.item())  # no reference yet
    new8, new16, new32 = (
        torch.tensor([1.0, 1.0, 0.0]),
        torch.tensor([0.0, -1.0, 0.0]),
        torch.tensor([5.0, 5.0, 5.0]),
    )
    staleness = probe.update(torch.tensor([8, 16, 32]), torch.stack([new8, new16, new32]))
    # 32 had no reference: only 8 and 16 count. cos(new8, old8) = 1/sqrt(2), cos(new16, old16) = -1.
    assert staleness.item() == pytest.approx((1 / math.sqrt(2) - 1.0) / 2)
    assert torch.equal(probe.vectors[1], new8) and torch.equal(probe.vectors[4], new32)
    assert probe.update(torch.tensor([32]), new32[None]).item() == pytest.approx(1.0)


def test_probe_follows_every_stride_th_id_with_a_bounded_table():
    probe = StalenessProbe(num_items=1682, d=2)
    assert probe.stride == 8 and probe.vectors.shape == (1682 // 8 + 1, 2)
    ids = torch.tensor([0, 3, 8, 1680, 1682])
    assert probe.probed(ids).tolist() == [False, False, True, True, False]
    vecs = torch.tensor([[1.0, 0.0]] * 5)
    assert math.isnan(probe.update(ids, vecs).item())
    assert probe.present.nonzero().flatten().tolist() == [1, 210]  # ids 8 and 1680
    turned = torch.tensor([[0.0, 1.0]] * 5)
    assert probe.update(ids, turned).item() == pytest.approx(0.0)  # only 8 and 1680, both orthogonal
    big = StalenessProbe(num_items=100_000, d=2)
    assert big.stride == 25 and big.vectors.shape[0] <= 4096 + 1
    assert set(MemoryBank(num_items=1682, d=2).state_dict()) == {"vectors", "written_step", "present"}


def test_in_batch_duplicates_are_averaged_and_padding_is_never_written():
    bank = _bank()
    ids = torch.tensor([3, 0, 3, 5])
    vecs = torch.tensor([[1.0, 2.0, 3.0], [9.0, 9.0, 9.0], [3.0, 4.0, 5.0], [1.0, 1.0, 1.0]])
    bank.write(ids, vecs, step=0)
    assert torch.equal(bank.vectors[3], torch.tensor([2.0, 3.0, 4.0]))
    assert not bank.present[0] and torch.equal(bank.vectors[0], torch.zeros(3))


def test_write_is_detached():
    bank = _bank()
    vecs = torch.randn(2, 3, requires_grad=True)
    bank.write(torch.tensor([1, 2]), vecs, step=0)
    assert not bank.vectors.requires_grad


def test_dedup_join_uses_fresh_vectors_with_gradient_and_bank_values_without():
    bank = _bank()
    bank.write(torch.tensor([1, 2, 3]), torch.ones(3, 3), step=0)
    hist = torch.tensor([[0, 1, 2, 4], [3, 2, 2, 1]])
    bank_vecs = bank.read(hist)
    fresh_ids = torch.tensor([2, 5, 2])
    fresh = torch.tensor([[1.0, 2.0, 3.0], [7.0, 7.0, 7.0], [3.0, 2.0, 1.0]], requires_grad=True)
    out = dedup_join(hist, bank_vecs, fresh_ids, fresh)
    is_two = (hist == 2)[..., None]
    assert torch.equal(out, torch.where(is_two, torch.tensor([2.0, 2.0, 2.0]), bank_vecs))
    out.sum().backward()
    # id 2 appears 3 times in the history; each of its two fresh copies gets half of each use.
    assert torch.equal(fresh.grad, torch.tensor([[1.5] * 3, [0.0] * 3, [1.5] * 3]))


def _join_with_grads(join, hist, bank_vecs, fresh_ids, fresh, weight):
    bank_vecs, fresh = bank_vecs.clone().requires_grad_(), fresh.clone().requires_grad_()
    out = join(hist, bank_vecs, fresh_ids, fresh)
    (out * weight).sum().backward()
    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in (bank_vecs, fresh)]
    return out.detach(), *grads


def test_dedup_join_matches_reference_forward_and_backward():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        hist = torch.randint(0, 12, (4, 9), generator=gen)
        bank_vecs = torch.randn(4, 9, 5, generator=gen)
        fresh_ids = torch.randint(0, 12, (int(torch.randint(0, 8, (1,), generator=gen)),), generator=gen)
        fresh = torch.randn(fresh_ids.numel(), 5, generator=gen)
        weight = torch.randn(4, 9, 5, generator=gen)
        fast = _join_with_grads(dedup_join, hist, bank_vecs, fresh_ids, fresh, weight)
        ref = _join_with_grads(dedup_join_reference, hist, bank_vecs, fresh_ids, fresh, weight)
        for a, b in zip(fast, ref, strict=True):
            torch.testing.assert_close(a, b)


def test_coverage_counts_present_ids_under_the_mask():
    bank = _bank()
    bank.write(torch.tensor([1, 2]), torch.ones(2, 3), step=0)
    ids = torch.tensor([[0, 1, 3], [2, 2, 4]])
    mask = ids != 0
    assert bank.coverage(ids, mask).item() == pytest.approx(3 / 5)
    assert bank.coverage(torch.tensor([1, 5])).item() == pytest.approx(0.5)
    assert math.isnan(bank.coverage(ids, torch.zeros_like(mask)).item())


def test_state_dict_round_trip():
    bank = _bank()
    bank.write(torch.tensor([1, 4]), torch.randn(2, 3), step=7)
    copy = MemoryBank(num_items=6, d=3)
    copy.load_state_dict(bank.state_dict())
    assert set(bank.state_dict()) == {"vectors", "written_step", "present"}
    ids = torch.tensor([0, 1, 2, 4])
    assert torch.equal(copy.read(ids), bank.read(ids))
    assert torch.equal(copy.written_step, bank.written_step)


def test_all_gather_write_without_a_process_group_is_a_local_write():
    a, b = _bank(), _bank()
    ids, vecs = torch.tensor([1, 3, 1]), torch.randn(3, 3)
    a.write(ids, vecs, step=3)
    b.all_gather_write(ids, vecs, step=3)
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.present, b.present)


RANK_WRITES = {
    0: (torch.tensor([1, 2, 2]), torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 3.0, 0]])),
    1: (torch.tensor([2, 5]), torch.tensor([[0, 0, 4.0], [1.0, 1.0, 1.0]])),
}


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    bank = MemoryBank(num_items=6, d=3)
    ids, vecs = RANK_WRITES[rank]
    bank.all_gather_write(ids, vecs, step=4)
    probe = StalenessProbe(num_items=48, d=3)
    probe.all_gather_update(8 * ids, vecs)
    staleness = probe.all_gather_update(8 * ids, vecs.flip(-1) if rank else vecs)
    torch.save({**bank.state_dict(), "staleness": staleness}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_all_gather_write_gives_every_rank_the_union(tmp_path):
    args = (2, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_gather_worker, args=args, nprocs=2, join=True, start_method="fork")
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expected = torch.zeros(7, 3)
    expected[1] = torch.tensor([1.0, 0, 0])
    expected[2] = torch.tensor([0, 4.0, 4.0]) / 3  # three copies of id 2 across ranks, averaged
    expected[5] = torch.tensor([1.0, 1.0, 1.0])
    for state in states:
        torch.testing.assert_close(state["vectors"], expected)
        assert state["present"].tolist() == [False, True, True, False, False, True, False]
        assert state["written_step"][2].item() == 4
    # Both ranks see the union of both ranks' probe updates, so they report the same staleness.
    assert states[0]["staleness"].item() == states[1]["staleness"].item() < 1.0


def test_probe_staleness_is_cosine_of_the_averaged_update():
    probe = StalenessProbe(num_items=16, d=3)
    probe.update(torch.tensor([8]), torch.tensor([[1.0, 0.0, 0.0]]))
    staleness = probe.update(torch.tensor([8, 8]), torch.tensor([[1.0, 2.0, 0.0], [1.0, -2.0, 2.0]]))
    mean = torch.tensor([1.0, 0.0, 1.0])
    assert staleness.item() == pytest.approx(
        F.cosine_similarity(mean, torch.tensor([1.0, 0.0, 0.0]), dim=0).item()
    )


def test_dedup_mean_matches_the_scatter_form_and_averages_gradients():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 9, (40,), generator=gen)
    vecs = torch.randn(40, 5, generator=gen, requires_grad=True)
    unique, mean = dedup_mean(ids, vecs)
    inverse = torch.searchsorted(unique, ids)
    sums = torch.zeros(unique.numel(), 5).index_add(0, inverse, vecs.detach())
    counts = torch.bincount(inverse, minlength=unique.numel())
    assert torch.equal(unique, torch.unique(ids))
    torch.testing.assert_close(mean.detach(), sums / counts[:, None])
    mean.sum().backward()
    torch.testing.assert_close(vecs.grad, (1.0 / counts[inverse].float())[:, None].expand(40, 5))
    again = dedup_mean(ids, vecs.detach())[1]
    assert torch.equal(again, mean.detach())  # the same rows summed in the same order
    empty_ids, empty = dedup_mean(ids[:0], vecs.detach()[:0])
    assert empty_ids.numel() == 0 and empty.shape == (0, 5)
