"""Where every rank is: the flight recorder's ops, ``where()``, and errors that say it."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import pdlab
from pdlab.measure.flight import BOX_SLOTS, BlackBox, dead, read_black_box
from pdlab.measure.where import Location, Op, summarize

from .helpers import line_of


@pytest.fixture(scope="module")
def cluster3():
    with pdlab.Cluster(3) as c:
        yield c


def skip_the_second_all_reduce_on_rank_1():
    import torch
    import torch.distributed as dist

    t = torch.ones(4)
    dist.all_reduce(t)
    if pdlab.rank() != 1:
        dist.all_reduce(t)  # the second


def test_a_rank_that_skips_a_collective_is_named_and_the_cluster_works_after(cluster3):
    with pytest.raises(pdlab.CallTimeout) as info:
        cluster3.run(skip_the_second_all_reduce_on_rank_1, timeout=5)
    where = info.value.where
    assert info.value.ranks == [0, 2]
    assert [p.rank for p in where] == [0, 1, 2]
    assert [p.state for p in where] == ["waiting", "finished", "waiting"]
    assert {p.op for p in where} == {"all_reduce"} and {p.group for p in where} == {"world"}
    second = where[0].seq
    assert where[2].seq == second and where[1].seq == second - 1  # rank 1's last: the first
    assert where[1].counts["world"] == second - 1 and where[0].counts["world"] == second
    line = line_of(skip_the_second_all_reduce_on_rank_1, "# the second")
    assert where[0].line == where[2].line == line
    assert where[0].shape == "[4] float32"
    message = str(info.value)
    assert (
        f"ranks 0 and 2 wait in all_reduce #{second} on group 'world' ({line}); "
        f"rank 1 never reached it: it finished after all_reduce #{second - 1} (1 in this call)"
    ) in message
    # Stuck ranks are stopped: until the next run starts fresh ones, they are all gone.
    assert [p.state for p in cluster3.where()] == ["dead"] * 3
    assert cluster3.run(pdlab.rank) == [0, 1, 2]


def test_sequence_numbers_are_c10ds_for_every_kind_of_op(cluster2):
    def many_ops():
        import torch
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        from pdlab import compat
        from pdlab.measure import flight

        rank, pair = dist.get_rank(), dist.new_group([0, 1])
        before, first = compat.sequence_numbers(), len(flight.ops())
        t = torch.ones(4)
        dist.all_reduce(t)
        dist.broadcast(t, 0)
        dist.all_gather_into_tensor(torch.empty(8), t)
        dist.reduce_scatter_tensor(torch.empty(2), t)
        dist.all_reduce(t, async_op=True).wait()
        if rank == 0:
            dist.send(t, 1)
            dist.isend(t, 1).wait()
        else:
            dist.recv(t, 0)
            dist.irecv(t, 0).wait()
        dist.all_reduce(t, group=pair)
        funcol.all_reduce(t, "sum", pair).wait()
        dist.barrier()
        after = compat.sequence_numbers()
        recorded = [(o.group, o.op, o.seq) for o in flight.ops()[first:]]
        done = all(o.end is not None for o in flight.ops()[first:])
        return before, after, recorded, done, pair.group_name

    for before, after, recorded, done, pair in cluster2.run(many_ops):
        world = next(g for g in after if g != pair and after[g] > before.get(g, 0))
        ops = [op for g, op, _ in recorded if g == world]
        assert ops[:-1] == [
            "all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_reduce", "send", "send",
        ] or ops[:-1] == [
            "all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_reduce", "recv", "recv",
        ]  # fmt: skip
        assert ops[-1] == "barrier"
        for group in (world, pair):
            seqs = [seq for g, _, seq in recorded if g == group]
            # every op recorded, numbered as c10d counts them
            assert seqs == list(range(before.get(group, 0) + 1, after[group] + 1)), group
        assert done  # every op seen complete, point-to-point ones at their wait


def test_mismatched_collectives_are_named_as_such(cluster2):
    def all_reduce_against_broadcast():
        import torch
        import torch.distributed as dist

        t = torch.ones(4)
        if pdlab.rank() == 0:
            dist.all_reduce(t)
        else:
            dist.broadcast(t, 0)

    with pytest.raises(pdlab.CallTimeout) as info:
        cluster2.run(all_reduce_against_broadcast, timeout=2)
    seq = info.value.where[0].seq
    assert (
        f"mismatched collectives at #{seq} on group 'world': rank 0 in all_reduce, "
        "rank 1 in broadcast"
    ) in str(info.value)


def test_where_answers_during_a_call_without_stopping_it(cluster2):
    cluster2.run(pdlab.rank)  # warm: an earlier test may have left it to restart
    source = "import time\nt = torch.ones(2)\nif pdlab.rank() == 1:\n    time.sleep(6)\ndist.all_reduce(t)\nt.sum().item()"
    results = []
    call = threading.Thread(target=lambda: results.append(cluster2.exec(source)))
    call.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # until rank 0 waits for rank 1, which sleeps
        answer = cluster2.where()
        if answer[0].state == "waiting" and answer[1].line == "cell line 4":
            break
        time.sleep(0.2)
    call.join()
    assert results == [[4.0, 4.0]]  # the call went on to its end
    rank0, rank1 = answer
    assert (rank0.state, rank0.op, rank0.line) == ("waiting", "all_reduce", "cell line 5")
    assert (rank1.state, rank1.line) == ("running", "cell line 4")
    assert rank1.stack[0] == "cell line 4 in <module>: time.sleep(6)"
    assert "rank 0 waits in all_reduce" in str(answer)
    between = cluster2.where()
    assert [p.state for p in between] == ["finished", "finished"]
    assert between[0].op == "all_reduce" and between[0].line == "cell line 5"


def test_an_error_while_a_peer_waits_says_where_each_rank_was(cluster2):
    def raise_before_all_reduce():
        import torch
        import torch.distributed as dist

        if pdlab.rank() == 0:
            raise RuntimeError("rank 0 gave up")
        dist.all_reduce(torch.ones(1))

    with pytest.raises(pdlab.RankError) as info:
        cluster2.run(raise_before_all_reduce)
    where = info.value.where
    assert [p.state for p in where] == ["finished", "waiting"]
    assert f"rank 0 never reached it: it raised RuntimeError after {where[0].last_on('world')}" in (
        str(info.value)
    )


def test_an_interrupted_call_says_where_the_ranks_were(cluster2, capfd):
    cluster2.run(pdlab.rank)  # warm: an earlier test may have left it to restart
    main = threading.main_thread().ident
    threading.Timer(1.5, signal.pthread_kill, (main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt) as info:
        cluster2.run(time.sleep, 30)
    assert [p.state for p in info.value.where] == ["running", "running"]
    assert "pdlab: interrupted: ranks 0 and 1 are running" in capfd.readouterr().err


def test_ddp_buckets_are_recorded_at_pdlabs_comm_hook(cluster2):
    pdlab.train(cluster2, strategy="dp", impl="torch", steps=2)
    ops = cluster2.where()[0].recent
    assert any(
        o.op == "all_reduce" and o.line.startswith("pdlab/training/parallel/data.py") for o in ops
    )


# ---- a dead rank's black box ------------------------------------------------------------------


def test_a_dead_ranks_black_box_says_what_it_died_in(cluster2):
    cluster2.run(pdlab.rank)  # warm: an earlier test may have left it to restart
    victim = cluster2.run(os.getpid)[1]

    def rank_1_waits_alone():
        import torch
        import torch.distributed as dist

        if pdlab.rank() == 1:
            dist.all_reduce(torch.ones(3))  # alone: rank 0 sleeps
        else:
            time.sleep(30)

    threading.Timer(2.0, os.kill, (victim, signal.SIGKILL)).start()
    with pytest.raises(pdlab.RankError, match="rank 1 died: it was killed by SIGKILL") as info:
        cluster2.run(rank_1_waits_alone)
    rank0, rank1 = info.value.where
    line = line_of(rank_1_waits_alone, "# alone")
    assert (rank1.state, rank1.op, rank1.group, rank1.line) == ("dead", "all_reduce", "world", line)
    assert rank1.shape == "[3] float32" and rank1.recent[-1].end is None
    assert f"rank 1 died in all_reduce #{rank1.seq} ({line})" in str(info.value)
    assert rank0.state == "running"


def test_gloos_abort_on_mismatched_shapes_is_named_as_such(cluster2):
    cluster2.run(pdlab.rank)

    def all_reduce_of_different_sizes():
        import torch
        import torch.distributed as dist

        dist.all_reduce(torch.ones(4 * (1 + pdlab.rank())))

    with pytest.raises(pdlab.RankError, match="killed by SIGABRT") as info:
        cluster2.run(all_reduce_of_different_sizes)  # gloo aborts a rank: sizes don't match
    seq = info.value.where[0].recent[-1].seq
    assert (
        f"mismatched shapes in all_reduce #{seq} on group 'world': "
        "rank 0 [4] float32, rank 1 [8] float32"
    ) in str(info.value)


def test_the_black_box_keeps_the_last_ops_in_order(tmp_path):
    box = BlackBox(str(tmp_path / "box"))
    ops = [
        Op("all_reduce", "0", seq, 4 * seq, f"[{seq}] float32", float(seq)) for seq in range(1, 101)
    ]
    for op in ops:
        box.write(op)
    ops[-1].end = 1000.0
    box.update(ops[-1])
    ops[0].end = 5.0
    box.update(ops[0])  # its slot was taken long ago: nothing changes
    back = read_black_box(str(tmp_path / "box"))
    assert [o.seq for o in back] == list(range(101 - BOX_SLOTS, 101))
    assert back[-1].end == 1000.0 and back[-2].end is None
    assert (back[-1].op, back[-1].group, back[-1].shape, back[-1].nbytes) == (
        "all_reduce", "0", "[100] float32", 400,
    )  # fmt: skip
    assert read_black_box(str(tmp_path / "missing")) == []


# ---- the sentence, from made-up answers ------------------------------------------------------


def waiting(rank, op="all_reduce", seq=3, shape="[4] float32", line="cell line 5"):
    issued = Op(op, "world", seq, 16, shape, 0.0, None, line)
    return Location(
        rank, "waiting", op, "world", seq, line, shape, recent=[issued], counts={"world": seq}
    )


def test_the_sentence_names_what_does_not_match():
    assert summarize([waiting(0), waiting(1)]) == (
        "ranks 0 and 1 wait in all_reduce #3 on group 'world' (cell line 5)"
    )
    assert summarize([waiting(0), waiting(1, shape="[8] float32")]) == (
        "mismatched shapes in all_reduce #3 on group 'world': rank 0 [4] float32, "
        "rank 1 [8] float32; ranks 0 and 1 wait in all_reduce #3 on group 'world' (cell line 5)"
    )
    assert summarize([waiting(0), waiting(1, op="broadcast", line="cell line 6")]) == (
        "mismatched collectives at #3 on group 'world': rank 0 in all_reduce, rank 1 in "
        "broadcast; rank 0 waits in all_reduce #3 on group 'world' (cell line 5); rank 1 "
        "waits in broadcast #3 on group 'world' (cell line 6)"
    )
    assert summarize([waiting(0), waiting(1, seq=4, line="cell line 7")]) == (
        "rank 0 waits in all_reduce #3 on group 'world' (cell line 5); "
        "rank 1 waits in all_reduce #4 on group 'world' (cell line 7)"
    )
    # A send and its recv share a sequence number: no mismatch.
    assert summarize([waiting(0, op="send", seq=2), waiting(1, op="recv", seq=2)]) == (
        "rank 0 waits in send #2 on group 'world' (cell line 5); "
        "rank 1 waits in recv #2 on group 'world' (cell line 5)"
    )


def test_the_sentence_says_why_a_rank_is_not_there():
    last = [Op("broadcast", "world", 2, 16, "[4] float32", 0.0, 1.0, "cell line 3")]
    finished = Location(1, "finished", counts={"world": 2}, recent=last)
    running = Location(2, "running", line="cell line 9", counts={"world": 1})
    died_in = dead(
        3, [Op("all_reduce", "0", 3, 16, "[4] float32", 0.0, None, "cell line 5")], {"0": "world"}
    )
    assert summarize(
        [waiting(0), finished, running, died_in, Location(4, "dead")], {1: "raised ValueError"}
    ) == (
        "rank 0 waits in all_reduce #3 on group 'world' (cell line 5); rank 1 never reached "
        "it: it raised ValueError after broadcast #2; rank 2 is running (cell line 9), after "
        "op #1; rank 3 died in all_reduce #3 (cell line 5); rank 4 died"
    )
    assert summarize([Location(0, "unknown"), Location(1, "finished")]) == (
        "rank 0 did not answer; rank 1 finished"
    )
