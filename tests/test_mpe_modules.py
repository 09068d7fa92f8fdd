"""MPE modules: frequency groups, sampling, the bit regulariser, the mixed-width table built
from a search (values, memory, retraining, state_dict) and the retrain flow on a model."""
import io

import pytest
import torch

import qembed
from qembed import formats, mpe, reference
from qembed.experiments.models import DNN
from qembed.nn import (
    MixedPrecisionEmbedding,
    MixedPrecisionEmbeddingBag,
    MixedPrecisionSearchEmbedding,
    MixedPrecisionSearchEmbeddingBag,
)
from qembed.nn.mpe import from_search


@pytest.mark.parametrize("rows,groups", [(1000, 128), (37, 8), (5, 128)])
def test_frequency_groups_match_independent_computation(rows, groups):
    counts = torch.randint(0, 20, (rows,))  # many ties: ties go by increasing id
    g = mpe.frequency_groups(counts, num_groups=groups)
    order = sorted(range(rows), key=lambda r: (-int(counts[r]), r))
    n = min(groups, rows)
    sizes = [rows // n + (1 if i < rows % n else 0) for i in range(n)]
    assert g.order.tolist() == order and g.sizes.tolist() == sizes
    pos = 0
    for gi, size in enumerate(sizes):
        members = order[pos: pos + size]
        pos += size
        assert [int(g.group[r]) for r in members] == [gi] * size
        assert [int(g.slot[r]) for r in members] == list(range(size))
    sums = [sum(int(counts[r]) for r in order[sum(sizes[:i]): sum(sizes[:i + 1])])
            for i in range(n)]
    want = [max(s, 1) / max(min(sums), 1) for s in sums]
    torch.testing.assert_close(g.weight, torch.tensor(want, dtype=torch.float32))


def test_frequency_groups_from_indices():
    ids = torch.randint(0, 50, (7, 30))
    a = mpe.frequency_groups(indices=ids, num_rows=60, num_groups=6)
    b = mpe.frequency_groups(torch.bincount(ids.flatten(), minlength=60), num_groups=6)
    assert torch.equal(a.group, b.group) and a.counts[50:].sum() == 0
    with pytest.raises(IndexError):
        mpe.frequency_groups(indices=ids, num_rows=10)
    with pytest.raises(ValueError):
        mpe.frequency_groups()


def test_sampling_rule_on_hand_made_distributions():
    m = 7  # threshold 1/14 ~ 0.0714
    probs = torch.tensor([
        [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],        # one-hot -> 3
        [0.5, 0.2, 0.2, 0.03, 0.03, 0.02, 0.02],    # largest above threshold -> 2
        [0.9, 0.04, 0.01, 0.01, 0.01, 0.01, 0.02],  # only 0 bits -> 0
        [0.08, 0.08, 0.08, 0.08, 0.08, 0.08, 0.52],  # top width qualifies -> 6
        [0.07, 0.07, 0.72, 0.07, 0.07, 0.0, 0.0],   # 0.07 < 1/14 -> 2
    ])
    assert mpe.sample_bits(probs, range(m)).tolist() == [3, 2, 0, 6, 2]
    # random distributions against the rule written as a loop
    probs = torch.softmax(torch.randn(50, 4) * 3, 1)
    cand = [0, 2, 4, 8]
    want = [max(b for b, p in zip(cand, row) if p >= 1 / 8) for row in probs.tolist()]
    assert mpe.sample_bits(probs, cand).tolist() == want


def test_bit_loss_and_search_gradients_reach_logits():
    counts = torch.randint(0, 100, (200,))
    table = MixedPrecisionSearchEmbedding(200, 16, groups=counts, num_groups=10, reg_lambda=0.3,
                                          tau=0.5)
    with torch.no_grad():
        table.logits.normal_()
    p = torch.softmax(table.logits.detach() / 0.5, 1)
    want = 0.3 * sum(float((p[g] * torch.arange(7.0)).sum()) / float(table.group_weight[g])
                     for g in range(10))
    loss = table.bit_loss()
    assert abs(float(loss) - want) < 1e-5
    loss.backward()
    assert (table.logits.grad.sum(1).abs() < 1e-4).all()  # softmax: rows sum to zero
    # the penalty pushes probability toward fewer bits
    assert (table.logits.grad[:, -1] > 0).all()


def searched(rows=300, dim=16, groups=8, bag=False, ordered=False):
    """A search table moved away from its start; ``ordered``: ids numbered by decreasing
    frequency, so that each group is a run of consecutive ids."""
    counts = torch.randint(0, 30, (rows,))
    if ordered:
        counts = counts.sort(descending=True).values
    cls = MixedPrecisionSearchEmbeddingBag if bag else MixedPrecisionSearchEmbedding
    table = cls(rows, dim, groups=counts, num_groups=groups, init_std=0.05)
    with torch.no_grad():
        table.logits.copy_(torch.randn_like(table.logits) * 0.01)  # widths of every size
        table.weight.add_(torch.randn_like(table.weight))  # search moved away from the start
        table.alpha.mul_(torch.rand(7) + 0.5)
        table.beta.normal_(0, 0.01)
    return table


@pytest.mark.parametrize("bag", [False, True])
def test_from_search_resets_to_initial_table_at_sampled_widths(bag):
    search = searched(bag=bag)
    group_bits = torch.tensor([0, 1, 2, 3, 4, 5, 6, 3])
    table = from_search(search, group_bits)
    assert isinstance(table, MixedPrecisionEmbeddingBag if bag else MixedPrecisionEmbedding)
    row_bits = group_bits[search.row_group]
    assert torch.equal(table.row_bits, row_bits)
    want = torch.zeros(300, 16)
    for b in range(1, 7):
        sel = row_bits == b
        want[sel] = reference.lsq_plus(search.initial_weight[sel], search.alpha.detach()[b],
                                       search.beta.detach(), b)
    torch.testing.assert_close(table.dequantize(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(table.export().dequantize(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bag", [False, True])
def test_groups_of_consecutive_ids_are_located_by_row_ranges(bag):
    search = searched(dim=24, bag=bag, ordered=True)
    group_bits = torch.tensor([6, 5, 5, 3, 0, 1, 0, 1])  # runs: 6 | 5 5 | 3 | 0 | 1 | 0 | 1
    table = from_search(search, group_bits)
    sizes = search.groups.sizes.tolist()
    firsts = [0] + torch.tensor(sizes).cumsum(0).tolist()
    assert table.location.dtype == torch.int32 and table.location.shape == (8, 2)
    assert table.location[:, 0].tolist() == [firsts[g] for g in (0, 1, 3, 4, 5, 6, 7, 8)]
    assert torch.equal(table.row_bits, group_bits[search.row_group])
    exported = table.export()
    codes = sum(s * 24 * int(b) // 8 for s, b in zip(sizes, group_bits))
    assert exported.nbytes == codes + 8 * 8 + 4 * 4 + 24 * 4  # codes, ranges, 4 steps, beta
    assert mpe.report(exported).code_bytes == codes + 4 * 4 + 24 * 4
    ids = torch.randint(0, 300, (40, 3))
    want = table.dequantize()[ids]
    got = table(ids.flatten(), torch.arange(0, 120, 3)) if bag else table(ids)
    torch.testing.assert_close(got, want.mean(1) if bag else want)
    # the same widths with ids in random order need the row map, and read the same
    perm = torch.randperm(300)
    cls = MixedPrecisionEmbeddingBag if bag else MixedPrecisionEmbedding
    shuffled = cls(300, 24, table.row_bits[perm], trainable=False)
    assert shuffled.location.dim() == 1 and torch.equal(shuffled.row_bits, table.row_bits[perm])


def test_memory_is_sum_of_packed_groups():
    search = searched(dim=24)
    group_bits = torch.tensor([6, 5, 4, 3, 2, 1, 0, 1])
    table = from_search(search, group_bits).export()
    sizes = search.groups.sizes
    codes = sum(int(s) * 24 * int(b) // 8 for s, b in zip(sizes, group_bits))
    assert table.location.dtype == torch.int16  # 300 rows: the map needs 2 bytes a row
    assert table.nbytes == codes + 300 * 2 + 6 * 4 + 24 * 4  # codes, row map, steps, beta
    rep = mpe.report(table)
    assert rep.code_bytes == codes + 6 * 4 + 24 * 4
    assert rep.average_bits == pytest.approx(float((sizes * group_bits).sum()) / 300)
    assert rep.compression == pytest.approx(300 * 24 * 4 / table.nbytes)
    trainable = from_search(search, group_bits)  # rows padded to 4 bytes for lowp_update
    padded = sum(int(s) * formats.row_bytes(24, int(b), "symmetric_table")
                 for s, b in zip(sizes, group_bits) if b)
    assert trainable.nbytes == padded + 300 * 2 + 6 * 4 + 24 * 4


@pytest.mark.parametrize("rows,map_dtype", [(2**15, torch.int16), (2**15 + 1, torch.int32)])
def test_row_map_is_as_narrow_as_the_table_allows(rows, map_dtype):
    row_bits = torch.randint(0, 3, (rows,))
    table = MixedPrecisionEmbeddingBag(rows, 8, row_bits)
    assert table.location.dtype == map_dtype
    stored = row_bits > 0
    assert torch.equal(table.location[stored].long().sort().values,
                       torch.arange(int(stored.sum())))
    assert bool((table.location[~stored] == -1).all())


@pytest.mark.parametrize("ordered", [False, True], ids=["row_map", "row_ranges"])
def test_retrain_step_updates_each_segment_with_lowp_update(ordered):
    search = searched(ordered=ordered)
    table = from_search(search, torch.tensor([6, 4, 4, 2, 1, 0, 0, 3]), optimizer="sgd",
                        lr=0.05, rounding="nearest")
    before = table.dequantize()
    ids = torch.randint(0, 300, (20, 4))
    grad = torch.randn(20, 4, 16)
    table.train()
    table(ids).backward(grad)
    # independent: each touched stored row moves by -lr * (sum of its gradients), re-rounded
    # to nearest with its width's step around beta
    total = torch.zeros(300, 16).index_add_(0, ids.flatten(), grad.reshape(-1, 16))
    row_bits, touched = table.row_bits, torch.zeros(300, dtype=torch.bool)
    touched[ids.flatten()] = True
    want = before.clone()
    for s, b in enumerate(table.widths):
        sel = touched & (row_bits == b)
        step = table.steps[s]
        w = before[sel] - table.beta - 0.05 * total[sel]
        want[sel] = step * torch.round(w / step).clamp(-(2 ** (b - 1)), 2 ** (b - 1) - 1) + table.beta
    torch.testing.assert_close(table.dequantize(), want, rtol=0, atol=1e-5)
    assert (table.dequantize()[row_bits == 0] == 0).all()
    assert table.location.dim() == (2 if ordered else 1)


@pytest.mark.parametrize("ordered", [False, True], ids=["row_map", "row_ranges"])
def test_state_dict_round_trip(ordered):
    search = searched(ordered=ordered)
    table = from_search(search, torch.tensor([6, 4, 4, 2, 1, 0, 0, 3]), optimizer="adam",
                        lr=0.01)
    table.train()
    for _ in range(3):
        table(torch.randint(0, 300, (8, 4))).pow(2).sum().backward()
    buffer = io.BytesIO()
    torch.save(table.state_dict(), buffer)
    buffer.seek(0)
    copy = MixedPrecisionEmbedding(300, 16, table.row_bits, optimizer="adam", lr=0.01)
    copy.load_state_dict(torch.load(buffer))
    for (name, a), (_, b) in zip(table.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 300, (5, 3))
    copy.eval(), table.eval()
    assert torch.equal(copy(ids), table(ids))
    exported = table.export()
    again = MixedPrecisionEmbedding(300, 16, table.row_bits, trainable=False)
    again.load_state_dict(exported.state_dict())
    assert torch.equal(again(ids), table(ids))


def test_retrain_model_keeps_dense_network():
    counts = torch.randint(0, 30, (30,))
    model = DNN([10, 20], 8, hidden=(16,), embedding_factory=lambda r, d:
                MixedPrecisionSearchEmbedding(r, d, groups=counts, num_groups=4))
    with torch.no_grad():
        model.embedding.weight.add_(1.0)
    retrained = qembed.retrain_model(model, optimizer="sgd", lr=0.1)
    assert isinstance(retrained.embedding, MixedPrecisionEmbedding)
    assert torch.equal(retrained.mlp[0].weight, model.mlp[0].weight)
    assert retrained.mlp[0].weight is not model.mlp[0].weight
    x = torch.stack([torch.randint(0, 10, (6,)), torch.randint(0, 20, (6,))], 1)
    retrained.train()
    before = retrained.embedding.dequantize()
    retrained(x).sum().backward()
    assert not torch.equal(before, retrained.embedding.dequantize())
    with pytest.raises(ValueError, match="no mixed-precision search table"):
        qembed.retrain_model(DNN([3], 8))


def test_module_errors():
    with pytest.raises(ValueError, match="candidate bit widths"):
        MixedPrecisionSearchEmbedding(10, 8, candidate_bits=[0, 1, 1])
    with pytest.raises(ValueError, match="row_bits"):
        MixedPrecisionEmbedding(10, 8, torch.zeros(9))
    with pytest.raises(ValueError, match="per_sample_weights"):
        MixedPrecisionSearchEmbeddingBag(10, 8)(torch.tensor([[1, 2]]),
                                                per_sample_weights=torch.ones(1, 2))
    with pytest.raises(TypeError, match="unknown"):
        MixedPrecisionEmbedding(10, 8, torch.zeros(10), bogus=1)
