"""DWGL and structured GSM under torch.distributed, and CURL's and CATRO's masked forwards split across ranks:
2 processes (torchrun, gloo, CPU) agree with each other and with one process."""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "dist_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def single():
    sys.path.insert(0, HERE)
    from dist_worker import run

    return run(world=1, rank=0)


def test_ranks_agree_on_masks_weights_and_plan(ranks):
    a, b = ranks
    assert len(a["masks"]) == len(b["masks"]) > 0
    for ma, mb in zip(a["masks"], b["masks"]):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert torch.equal(ma[k], mb[k]), k
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k        # DDP keeps replicas bit-identical
    assert a["plan"] == b["plan"] and a["plan"]                    # the same, non-empty plan
    assert all(torch.equal(a["votes"][k], b["votes"][k]) for k in a["votes"])
    assert a["scheduled"].keys() == b["scheduled"].keys() and a["scheduled"]   # the budget schedule agrees
    assert all(torch.equal(a["scheduled"][k], b["scheduled"][k]) for k in a["scheduled"])


def test_ddp_equals_single_process(ranks, single):
    a = ranks[0]
    for ms, md in zip(single["masks"], a["masks"]):
        for k in ms:
            assert torch.equal(ms[k], md[k]), k
    # a passive channel really gets no gradient: some channel is passive in every step
    passive = [int((~m).sum()) for step in single["masks"] for m in step.values()]
    assert sum(passive) > 0
    for k in single["state"]:
        torch.testing.assert_close(a["state"][k], single["state"][k], rtol=1e-4, atol=1e-5)
    assert a["plan"] == single["plan"]


def test_curl_and_catro_split_their_masked_forwards_and_score_as_one_process(ranks, single):
    a, b = ranks
    for name in single["curl"]:
        assert torch.equal(a["curl"][name], single["curl"][name]), name   # bit for bit: the same passes
        assert torch.equal(b["curl"][name], single["curl"][name]), name
    assert any(bool((s > 0).any()) for s in single["curl"].values())
    # each rank ran about half of the passes
    assert a["curl_forwards"] + b["curl_forwards"] == pytest.approx(single["curl_forwards"], rel=0.35)
    assert max(a["curl_forwards"], b["curl_forwards"]) < 0.8 * single["curl_forwards"]
    assert a["catro"] == b["catro"] == single["catro"] and single["catro"]
