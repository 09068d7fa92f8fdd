"""qembed's collections sharded by TorchRec's DistributedModelParallel over 2 processes
(gloo on 127.0.0.1): every sharding type's forward, training bit-identical to one process
where promised and close where a statistic is kept per shard, tables drawn from the seed,
checkpoints across world sizes (2 -> 1 -> 2), the planner on CPU and CUDA, and faults.

Each test launches its processes once (tests/sharding_cases.py runs in them) and kills
them past its time bound; skipped where TorchRec is not installed."""
import pytest

pytest.importorskip("torchrec")

import sharding_cases as cases  # noqa: E402

PLANS = list(cases.PLANS)
BOUND_S = 600  # a launch's time bound on a busy 2-core machine


def test_forward_equals_unsharded_for_every_sharding(tmp_path):
    """Inference tables with power-of-two steps: every bag's sum is exact, so every sharding
    (row-wise ones added across ranks too) returns the unsharded bits, one-hot or not, the
    mean of row-split tables and TorchRec's table-wise-sum beside row-wise-mean mix included."""
    for report in cases.run("forward_case", tmp_path, kind="quantized", bits=8, plans=PLANS,
                            exact_steps=True, timeout_s=BOUND_S):
        for (plan, batches), diffs in report.items():
            assert all(same for _, same, _ in diffs.values()), (plan, batches, diffs)


def test_weighted_forward_equals_unsharded_for_every_sharding(tmp_path):
    """A weighted collection (per-sample weights carried with the ids to every shard),
    fp16 output."""
    for report in cases.run("forward_case", tmp_path, kind="quantized", bits=4, plans=PLANS,
                            exact_steps=True, weighted=True, output_dtype=cases.torch.float16,
                            timeout_s=BOUND_S):
        for (plan, batches), diffs in report.items():
            assert all(same for _, same, _ in diffs.values()), (plan, batches, diffs)


def test_forward_of_training_tables(tmp_path):
    """Low-precision tables (steps from the data): one-id bags are bit-identical under every
    sharding; multi-id bags too where a bag's rows are pooled on one rank (table-wise,
    column-wise), within float reordering (a few last bits) where ranks add partial bags."""
    report = cases.run("forward_case", tmp_path, kind="lowp", bits=4, plans=PLANS,
                       exact_steps=False, timeout_s=BOUND_S)
    reordered = False
    for rank_report in report:
        for (plan, batches), diffs in rank_report.items():
            if batches == "one-hot" or plan in ("table_wise", "column_wise"):
                assert all(same for _, same, _ in diffs.values()), (plan, batches, diffs)
            else:
                assert all(d <= 2 ** -20 * scale for d, _, scale in diffs.values()), \
                    (plan, batches, diffs)
                reordered |= not all(same for _, same, _ in diffs.values())
    assert reordered  # the partial sums do add in another order here


def test_torchrec_divisor_defect_is_what_qembed_avoids(tmp_path):
    """TorchRec 1.8's sharded collection, a table-wise sum table beside a row-wise mean one:
    its mean table is right, its sum table comes back divided by the bag lengths (plus its
    1e-6). qembed's sharded collections give the unsharded bits on that mix (the "mixed"
    plan of the forward tests)."""
    for report in cases.run("torchrec_divisor_case", tmp_path, timeout_s=BOUND_S):
        for key, (pooling, diff, diff_times_length) in report.items():
            if pooling == "mean":
                assert diff < 1e-6, (key, diff)
            else:
                assert diff > 1e-2 and diff_times_length < 1e-6, (key, diff, diff_times_length)


BIT_IDENTICAL = [("table_wise", 8, {}), ("row_wise", 4, {}), ("table_row_wise", 8, {}),
                 ("mixed", 4, {"optimizer": "sgd", "learn_step": False}),
                 ("row_wise", 8, {"optimizer": "adam", "step_optimizer": "adam"}),
                 ("table_wise", 4, {"step_per": "table", "learn_step": True}),
                 ("column_wise", 8, {"optimizer": "adam", "learn_step": False}),
                 ("column_wise", 4, {"optimizer": "sgd", "learn_step": False,
                                     "step_per": "table"})]


def test_training_is_bit_identical_to_one_process(tmp_path):
    """3 steps, stochastic rounding, 8 and 4 bits: codes, steps, optimizer state and update
    counters equal the unsharded collection's trained on the global batches, for every
    sharding where nothing the update reads is split (row-wise Adagrad and learned per-row
    steps under row splits; Adam and SGD with fixed steps under column splits; a learned
    per-table step on a table-wise table)."""
    for report in cases.run("train_case", tmp_path, runs=BIT_IDENTICAL, timeout_s=BOUND_S):
        for i, run in report.items():
            assert run.pop("moved"), BIT_IDENTICAL[i]
            assert run, BIT_IDENTICAL[i]  # every rank holds some shard in these plans
            differ = {k: v for k, v in run.items() if not v[0]}
            assert not differ, (BIT_IDENTICAL[i], differ)


PER_SHARD = [("column_wise", 8, {}), ("column_wise", 4, {"optimizer": "adam"}),
             ("row_wise", 8, {"step_per": "table"})]


def test_statistics_kept_per_shard_train_close(tmp_path):
    """Column-wise row-wise Adagrad and learned per-row steps, and a learned per-table step
    on a row-wise table, are kept one per shard: each shard's values move as the unsharded
    table's do, within half of how far those moved (Adagrad's per-row scale, taken over a
    shard's columns, differs by a factor near 1), and are not the same."""
    reports = cases.run("train_case", tmp_path, runs=PER_SHARD, grad_scale=1e-3,
                        timeout_s=BOUND_S)
    for i in range(len(PER_SHARD)):
        runs = [report[i] for report in reports]
        assert all(run.pop("moved") for run in runs)
        for run in runs:
            for (table, what), (_, diff, moved, _) in run.items():
                if what == "values":
                    assert 0 < moved and diff <= 0.5 * moved, (PER_SHARD[i], table, diff, moved)
        assert any(not v[0] for run in runs for v in run.values()), PER_SHARD[i]


def test_tables_built_on_meta_are_drawn_from_the_seed(tmp_path):
    """A collection built on the meta device and sharded holds, on every rank, the rows and
    columns of the collection built on the CPU with the same seed; reset_parameters()
    returns a trained one to them."""
    plans = ["mixed", "column_wise"]
    for report in cases.run("meta_init_case", tmp_path, plans=plans, timeout_s=BOUND_S):
        for plan in plans:
            initial, reset = report[(plan, "initial")], report[(plan, "reset")]
            assert initial and all(initial.values()), (plan, initial)
            assert not all(report[(plan, "trained")].values()), plan
            assert all(reset.values()), (plan, reset)


def test_checkpoint_2_to_1_to_2_continues_bit_exactly(tmp_path):
    """2 processes train 2 steps and save with torch.distributed.checkpoint; one process loads
    that into the unsharded collection (equal to 2 unsharded steps), trains a 3rd step and
    saves a plain state dict; 2 processes with another split load it (and, separately, the
    first checkpoint resharded) and train on: equal to 4 unsharded steps."""
    import torch
    import torch.distributed.checkpoint as dcp

    sharded_dir, plain = tmp_path / "sharded", tmp_path / "plain.pt"
    cases.run("checkpoint_save_case", tmp_path / "save", path=str(sharded_dir), steps=2,
              timeout_s=BOUND_S)
    model = cases.Model(cases.collection("lowp", cases.configs(), 4, seed=99))
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(sharded_dir))
    model.load_state_dict(state)
    reference = cases.Model(cases.collection("lowp", cases.configs(), 4, seed=5))
    cases.train_steps(reference.sparse, 0, 2)
    want = reference.state_dict()
    assert {k: torch.equal(v, want[k]) for k, v in model.state_dict().items()} == \
        {k: True for k in want}
    cases.train_steps(model.sparse, 2, 3)
    torch.save(model.state_dict(), plain)
    for report in cases.run("checkpoint_load_case", tmp_path / "load", plain_path=str(plain),
                            dcp_path=str(sharded_dir), plain_steps=3, dcp_steps=2,
                            total_steps=4, timeout_s=BOUND_S):
        for source, compared in report.items():
            assert compared and all(compared.values()), (source, compared)


def test_column_wise_checkpoint_reloads_on_other_ranks(tmp_path):
    """Column-wise shards saved stacked reload into the same split placed on the other
    ranks, and take the unsharded collection's plain state, then train on bit-exactly."""
    for report in cases.run("column_checkpoint_case", tmp_path, path=str(tmp_path / "ckpt"),
                            timeout_s=BOUND_S):
        for source, compared in report.items():
            assert compared and all(compared.values()), (source, compared)


def test_planner_places_tables_on_cpu_and_cuda(tmp_path):
    """TorchRec's planner offers every sharding type on CPU (its stock sharders offer
    row-wise only on CUDA) and on CUDA; the planned CPU models look up as the unsharded one."""
    for report in cases.run("planner_case", tmp_path, timeout_s=BOUND_S):
        assert report["constrained"] == {"t0": ("row_wise", 2), "t1": ("table_wise", 1),
                                         "t2": ("column_wise", 2), "t3": ("table_row_wise", 2)}
        assert report["constrained equal"] and report["free equal"]
        assert report["cuda"] == {"t0": "row_wise", "t1": "table_wise", "t2": "column_wise",
                                  "t3": "table_row_wise"}


def test_unsupported_plans_are_refused_clearly(tmp_path):
    for messages in cases.run("bad_plan_case", tmp_path, timeout_s=BOUND_S):
        assert "column-wise shards must have one width, a multiple of 8" in messages[0]
        assert "sharded training needs every table updated by the fused update" in messages[1]
        assert "sharding type 'data_parallel' is not supported" in messages[2]


def test_an_id_outside_its_table_fails_every_rank_within_the_timeout(tmp_path):
    """Rank 1 names the feature, table and id and the timeout; rank 0, left waiting in the
    input distribution while rank 1 lives on, fails when the timeout expires."""
    timeout = 10
    results = cases.run("bad_id_case", tmp_path, pg_timeout_s=timeout, linger_s=timeout + 5,
                        timeout_s=BOUND_S, expect_failure=True)
    (code0, (outcome0, waited0), _), (code1, (outcome1, _), _) = results
    assert code0 == 0 and code1 == 0
    assert outcome1.startswith("IndexError: qembed: feature 'f4' (table 't3') has id 20, "
                               "outside its table of 20 rows, on rank 1")
    assert f"the process group's timeout ({timeout} s)" in outcome1
    assert outcome0 != "returned" and timeout * 0.9 <= waited0 <= timeout + 30, (outcome0,
                                                                                  waited0)


def test_a_dead_rank_fails_the_others_within_the_timeout(tmp_path):
    timeout = 30
    results = cases.run("dying_rank_case", tmp_path, pg_timeout_s=timeout, timeout_s=BOUND_S,
                        expect_failure=True)
    (code0, (outcome0, waited0), _), (code1, _, _) = results
    assert code1 == 3 and code0 == 0
    assert outcome0 != "returned" and waited0 <= timeout + 10, (outcome0, waited0)
