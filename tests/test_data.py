import gzip
import math
import random
from collections import Counter

import pytest
import torch

from qembed.experiments import data as D


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def check_encoding(raw_columns, dataset, min_count):
    """Field by field, ids must be 0 exactly for values seen fewer than min_count times, the
    others distinct per value, numbered 1.. by decreasing count, and listed in the vocab."""
    assert dataset.field_dims == [len({v for v, c in Counter(col).items() if c >= min_count}) + 1
                                  for col in raw_columns]
    for f, column in enumerate(raw_columns):
        counts = Counter(column)
        ids = dataset.x[:, f].tolist()
        mapping = {}
        for value, i in zip(column, ids):
            assert (i == 0) == (counts[value] < min_count)
            if i:
                assert mapping.setdefault(value, i) == i
        assert len(set(mapping.values())) == len(mapping) and dataset.vocab[f] == mapping
        by_id = sorted(mapping, key=mapping.get)
        assert sorted(mapping.values()) == list(range(1, len(mapping) + 1))
        assert [counts[v] for v in by_id] == sorted((counts[v] for v in by_id), reverse=True)


def random_libfm(rng, n, field_sizes):
    starts = [sum(field_sizes[:f]) for f in range(len(field_sizes))]
    rows = [[s + min(int(rng.expovariate(0.5)), size - 1) for s, size in zip(starts, field_sizes)]
            for _ in range(n)]
    labels = [rng.choice([1, -1]) for _ in range(n)]
    lines = [f"{y} " + " ".join(f"{i}:1" for i in row) for y, row in zip(labels, rows)]
    return rows, labels, lines


@pytest.mark.parametrize("min_count", [1, 3])
def test_libfm_ids_per_field_with_min_count(tmp_path, min_count):
    rng = random.Random(min_count)
    rows, labels, lines = random_libfm(rng, 300, [7, 20, 3])
    half = len(lines) // 2
    paths = [write(tmp_path / "a.libfm", lines[:half]), write(tmp_path / "b.libfm", lines[half:])]
    d = D.load_libfm(paths, min_count=min_count, progress=False)
    assert d.x.shape == (300, 3) and d.field_names == ["field0", "field1", "field2"]
    assert d.y.tolist() == [float(y == 1) for y in labels]
    check_encoding([[str(r[f]) for r in rows] for f in range(3)], d, min_count)


def test_vocab_maps_unseen_values_to_oov(tmp_path):
    rng = random.Random(1)
    rows, _, lines = random_libfm(rng, 200, [30, 30])
    rows.append([1000, 2000])  # values no training row has
    lines.append("1 1000:1 2000:1")
    train = D.load_libfm(write(tmp_path / "train.libfm", lines[:100]), progress=False)
    other = D.load_libfm(write(tmp_path / "other.libfm", lines[100:]), vocab=train.vocab,
                         progress=False)
    assert other.field_dims == train.field_dims
    for f in range(2):
        seen = {str(r[f]): i for r, i in zip(rows[:100], train.x[:, f].tolist())}
        expected = [seen.get(str(r[f]), 0) for r in rows[100:]]
        assert other.x[:, f].tolist() == expected
        assert 0 in expected  # the check above covered unseen values


def test_avazu_csv(tmp_path):
    rng = random.Random(2)
    header = "id,click,hour,C1,site_id,device_ip"
    hours = ["14102100", "14102213", "14102623"]  # Tue 21, Wed 22, Sun 26 Oct 2014
    rows = [[str(rng.getrandbits(60)), rng.choice("01"), rng.choice(hours),
             rng.choice(["1005", "1002"]), f"{rng.randrange(6):08x}", f"{rng.getrandbits(32):08x}"]
            for _ in range(120)]
    path = write(tmp_path / "avazu.csv", [header] + [",".join(r) for r in rows])

    d = D.load_avazu(path, min_count=2, progress=False)
    assert d.field_names == ["hour_of_day", "weekday", "C1", "site_id", "device_ip"]
    assert d.y.tolist() == [float(r[1]) for r in rows]
    weekday = {"14102100": "1", "14102213": "2", "14102623": "6"}
    columns = [[r[2][6:] for r in rows], [weekday[r[2]] for r in rows]] + \
              [[r[i] for r in rows] for i in (3, 4, 5)]
    check_encoding(columns, d, 2)

    raw = D.load_avazu(path, split_hour=False, progress=False)
    assert raw.field_names == ["hour", "C1", "site_id", "device_ip"]
    check_encoding([[r[i] for r in rows] for i in (2, 3, 4, 5)], raw, 1)


def criteo_bucket_reference(value):
    if value == "":
        return ""
    v = int(value)
    return str(math.floor(math.log(v) ** 2) if v > 2 else v)


def test_criteo_tsv_bucketises_integers(tmp_path):
    rng = random.Random(3)
    ints = ["", "-2", "-1", "0", "1", "2", "3", "4", "5", "9", "10", "100", "12345", "999999"]
    rows = [[rng.choice("01")] + [rng.choice(ints) for _ in range(13)]
            + [rng.choice(["", "a9f0c2d1", "0b1c2d3e", f"{rng.getrandbits(32):08x}"])
               for _ in range(26)]
            for _ in range(200)]
    path = write(tmp_path / "day.txt", ["\t".join(r) for r in rows])
    d = D.load_criteo(path, min_count=2, progress=False)
    assert d.x.shape == (200, 39) and d.field_names[0] == "I1" and d.field_names[-1] == "C26"
    assert d.y.tolist() == [float(r[0]) for r in rows]
    buckets = [[criteo_bucket_reference(r[1 + f]) for r in rows] for f in range(13)]
    cats = [[r[14 + f] for r in rows] for f in range(26)]
    check_encoding(buckets + cats, d, 2)


@pytest.mark.parametrize("name,text,where", [
    ("bad.libfm", "1 3:1 9:1\n-1 4:1\n", ":2:"),
    ("bad.libfm", "1 3:1 9:1\n2 4:1 8:1\n", ":2:"),
    ("bad.libfm", "1 3:1 9:1\n\n-1 4:1 8:1\n", ":2:"),
    ("bad.libfm", "1 3:1 9:0.5\n", ":1:"),
    ("bad.csv", "id,click,C1\n1,0,a\n2,1\n", ":3:"),
    ("bad.csv", "id,click,hour\n1,0,14102100\n2,0,141021\n", ":3:"),
    ("bad.txt", "\t".join(["0"] + ["1"] * 13 + ["x"] * 26) + "\n"
     + "\t".join(["1", "7.5"] + ["1"] * 12 + ["x"] * 26) + "\n", ":2:"),
    ("bad.txt", "0\t1\t2\n", ":1:"),
])
def test_malformed_lines_name_file_and_line(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{name}{where}"):
        D.load(path, progress=False)


def test_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.libfm"):
        D.load(tmp_path / "nope.libfm")
    with pytest.raises(ValueError, match="unknown data format"):
        D.load(write(tmp_path / "data.parquet", ["x"]))
    with pytest.raises(ValueError, match="click"):
        D.load(write(tmp_path / "noclick.csv", ["id,label,C1", "1,0,a"]))
    with pytest.raises(ValueError, match="no data rows"):
        D.load(write(tmp_path / "empty.csv", ["id,click,C1"]), progress=False)
    monkeypatch.setenv("QEMBED_DATA", str(tmp_path / "absent"))
    assert D.data_dir() is None
    with pytest.raises(FileNotFoundError, match="frappe"):
        D.load("frappe")


def test_load_dispatch_and_gzip(tmp_path, monkeypatch):
    lines = ["\t".join([str(i % 2)] + [str(i)] * 13 + [f"c{i % 3}"] * 26) for i in range(20)]
    plain = D.load(write(tmp_path / "criteo_small.tsv", lines), progress=False)
    with gzip.open(tmp_path / "criteo_small.txt.gz", "wt") as f:
        f.write("".join(line + "\n" for line in lines))
    packed = D.load(tmp_path / "criteo_small.txt.gz", progress=False)
    assert torch.equal(plain.x, packed.x) and torch.equal(plain.y, packed.y)
    monkeypatch.setenv("QEMBED_DATA", str(tmp_path))
    (tmp_path / "criteo_small.tsv").unlink()
    assert D.data_dir() == tmp_path
    assert torch.equal(D.load("criteo", progress=False).x, plain.x)
    syn = D.load(None, num_samples=50, field_dims=(4, 3))
    assert syn.x.shape == (50, 2)


def indexed_dataset(n):
    """Field 0 holds the row number, so rows can be traced through splits and batches."""
    x = torch.stack([torch.arange(n), torch.randint(0, 5, (n,))], 1)
    return D.CTRDataset(x, torch.randint(0, 2, (n,)).float(), [n, 5])


def test_split_is_deterministic_disjoint_and_complete():
    d = indexed_dataset(1001)
    parts = d.split((0.8, 0.1, 0.1), seed=7)
    assert [len(p) for p in parts] == [801, 100, 100]
    rows = torch.cat([p.x[:, 0] for p in parts])
    assert sorted(rows.tolist()) == list(range(1001))
    for p in parts:  # labels travel with their rows
        assert torch.equal(p.y, d.y[p.x[:, 0]]) and p.field_dims == d.field_dims
    again = d.split((0.8, 0.1, 0.1), seed=7)
    assert all(torch.equal(a.x, b.x) for a, b in zip(parts, again))
    other = d.split((0.8, 0.1, 0.1), seed=8)
    assert not torch.equal(parts[1].x, other[1].x)
    with pytest.raises(ValueError, match="sum to 1"):
        d.split((0.5, 0.2))


def test_batches_cover_rows_once_in_seeded_order():
    d = indexed_dataset(103)
    plain = list(d.batches(25))
    assert [len(x) for x, _ in plain] == [25, 25, 25, 25, 3]
    assert torch.equal(torch.cat([x for x, _ in plain]), d.x)

    def order_of(seed):
        return torch.cat([x[:, 0] for x, _ in d.batches(25, shuffle=True, seed=seed)])

    order = order_of(1)
    assert sorted(order.tolist()) == list(range(103)) and order.tolist() != list(range(103))
    assert torch.equal(order, order_of(1)) and not torch.equal(order, order_of(2))
    for x, y in d.batches(25, shuffle=True, seed=1):
        assert torch.equal(y, d.y[x[:, 0]])


def test_feature_counts_and_offsets():
    d = indexed_dataset(50)
    counts = d.feature_counts()
    assert counts.shape == (55,) and d.offsets.tolist() == [0, 50]
    expected = Counter(d.x[:, 0].tolist()) + Counter((50 + d.x[:, 1]).tolist())
    assert counts.tolist() == [expected[i] for i in range(55)]


def test_dataset_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="outside"):
        D.CTRDataset(torch.tensor([[0, 3]]), torch.zeros(1), [2, 3])
    with pytest.raises(ValueError, match="field_dims"):
        D.CTRDataset(torch.tensor([[0, 1]]), torch.zeros(1), [2])


def test_synthetic_is_deterministic_zipf_and_balanced():
    kwargs = dict(num_samples=20_000, field_dims=(300, 50, 8), positive_rate=0.3)
    a, b = D.synthetic(seed=5, **kwargs), D.synthetic(seed=5, **kwargs)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    c = D.synthetic(seed=6, **kwargs)
    assert not torch.equal(a.x, c.x) and not torch.equal(a.y, c.y)
    assert a.field_dims == [300, 50, 8] and a.vocab is None
    assert abs(a.y.mean().item() - 0.3) < 0.015
    # the k-th most frequent value of a field has frequency ~ k^-1.1
    counts = torch.bincount(a.x[:, 0], minlength=300).sort(descending=True).values.double()
    k = torch.arange(1, 21, dtype=torch.float64)
    design = torch.stack([k.log(), torch.ones_like(k)], 1)
    fit = torch.linalg.lstsq(design, counts[:20].log().unsqueeze(1)).solution
    assert -1.3 < fit[0].item() < -0.9


def frappe_and_avazu():
    root = D.data_dir()
    if (root is None or not (root / "avazu_union.csv").is_file()
            or not list(root.glob("frappe*.libfm"))):
        pytest.skip("shared data folder not present")
    return root


def test_real_frappe():
    frappe_and_avazu()
    d = D.load("frappe", progress=False)
    assert d.x.shape == (57_722 + 28_860, 10) and len(d.field_dims) == 10
    assert d.y.sum().item() == 19_063 + 9_536
    assert sum(d.field_dims) - 10 <= 5_382  # kept values plus one OOV id per field
    train, valid, test = d.split()
    for part in (train, valid, test):
        assert 0.3 < part.y.mean().item() < 0.36


def test_real_avazu():
    root = frappe_and_avazu()
    d = D.load(root / "avazu_union.csv", min_count=2, progress=False)
    assert d.x.shape == (9_999, 23) and d.y.sum().item() == 1_706
    assert d.field_names[:3] == ["hour_of_day", "weekday", "C1"]
    assert set(d.vocab[1]) == {"1"}  # the sample's rows are all from Tuesday 2014-10-21


def test_renumbered_orders_each_field_by_the_given_counts():
    full = D.synthetic(num_samples=3000, field_dims=(50, 20, 7), seed=3)
    train, valid, _ = full.split(seed=1)
    counts = train.feature_counts()
    renumbered = train.renumbered(counts)
    new_counts = renumbered.feature_counts()
    start = 0
    for f, dim in enumerate(full.field_dims):
        old, new = counts[start:start + dim], new_counts[start:start + dim]
        # id 0 stays; the others carry the same counts, non-increasing, ties in old-id order
        assert new[0] == old[0]
        assert new[1:].tolist() == sorted(old[1:].tolist(), reverse=True)
        # a bijection per field: the same old id always gets the same new id
        pairs = set(zip(train.x[:, f].tolist(), renumbered.x[:, f].tolist()))
        assert len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(pairs)
        start += dim
    assert torch.equal(renumbered.y, train.y)
    # every split renumbered alike: valid's rows map through the same per-field bijection
    again = valid.renumbered(counts)
    mapping = {(f, a): b for f in range(3)
               for a, b in zip(train.x[:, f].tolist(), renumbered.x[:, f].tolist())}
    for f in range(3):
        for a, b in zip(valid.x[:, f].tolist(), again.x[:, f].tolist()):
            assert mapping.get((f, a), b) == b
    with pytest.raises(ValueError, match="entries"):
        train.renumbered(counts[:-1])


def test_renumbered_keeps_the_vocabulary_consistent(tmp_path):
    path = write(tmp_path / "d.libfm", ["1 0:1 3:1", "-1 1:1 3:1", "1 1:1 4:1", "1 2:1 4:1",
                                        "-1 1:1 4:1"])
    data = D.load_libfm(path)
    counts = torch.tensor([0, 3, 1, 0, 0, 0, 1, 2, 0, 0])[: sum(data.field_dims)]
    out = data.renumbered(counts)
    for f, (old, new) in enumerate(zip(data.vocab, out.vocab)):
        assert old.keys() == new.keys()
        for value in old:
            rows = data.x[:, f] == old[value]
            assert bool((out.x[rows, f] == new[value]).all())
