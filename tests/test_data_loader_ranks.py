"""BatchLoader on two real ranks (torchrun, gloo): every rank takes the same number of batches per pass, with a
corrupt file on one rank and with aspect buckets that split the ranks' items differently; a mid-epoch resume
gives the batches of the uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("av", reason="PyAV writes the test videos")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import datetime, json, sys, torch.distributed as dist
from engine.data import BatchLoader, ResumableSampler, VideoDataset

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
out = {}
for name, drop_last, buckets in (("corrupt", True, False), ("buckets", False, True)):
    def make():
        ds = VideoDataset(sys.argv[1] + f"/{name}.jsonl", num_frames=2, height=16, width=16,
                          aspect_buckets=buckets, bucket_multiple=8, decoder="pyav")
        return BatchLoader(ds, ResumableSampler(len(ds), rank=rank, world_size=2, seed=0), batch_size=2,
                           num_threads=1, prefetch=3, drop_last=drop_last)
    loader = make()
    epochs = []
    for _ in range(3):
        epochs.append([b["index"] for b in loader])
    out[name] = {"epochs": epochs, "state": loader.state_dict()}
    loader = make()
    it = iter(loader)
    head = [next(it)["index"]]
    state = json.loads(json.dumps(loader.state_dict()))
    it.close()
    resumed = make()
    resumed.load_state_dict(state)
    out[name]["resumed"] = head + [b["index"] for b in resumed]
    out[name]["next"] = [b["index"] for b in resumed]
gathered = [None, None]
dist.all_gather_object(gathered, out)
if rank == 0:
    print("RESULT " + json.dumps(gathered), flush=True)
dist.destroy_process_group()
"""


def test_ranks_take_the_same_number_of_batches(tmp_path):
    """Before, the rank with the corrupt file took one batch an epoch, the other two (and with buckets, 3 against
    2): a training loop's all-reduces paired one rank's next epoch with the other's last step, and a run that
    ends or checkpoints at an epoch's end waited forever on the rank still in it."""
    from engine.data.synthetic import write_video

    rows = {"corrupt": [], "buckets": []}
    for i in range(8):
        write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=2, height=16, width=16)
        write_video(tmp_path / f"w{i}.webm", ident=i, num_frames=2, height=16, width=16 if i % 3 else 32)
        rows["corrupt"].append(json.dumps({"video": f"v{i}.webm"}))
        rows["buckets"].append(json.dumps({"video": f"w{i}.webm"}))
    (tmp_path / "v5.webm").write_bytes(b"not a video")
    for name, r in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("\n".join(r))
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    p = subprocess.run(
        [*torchrun, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    ranks = json.loads(p.stdout.split("RESULT ", 1)[1].splitlines()[0])
    print({name: [r[name]["epochs"] for r in ranks] for name in rows})
    for name in rows:
        r0, r1 = ranks[0][name], ranks[1][name]
        assert [len(e) for e in r0["epochs"]] == [len(e) for e in r1["epochs"]], name
        assert r0["state"]["sampler"] == {**r1["state"]["sampler"], "epoch": r0["state"]["sampler"]["epoch"]}
        assert r0["state"]["sampler"]["epoch"] == 3 and r0["state"]["pending"] == r1["state"]["pending"] == []
        for r in (r0, r1):
            for epoch in r["epochs"]:
                flat = [i for b in epoch for i in b]
                assert len(flat) == len(set(flat))
                if name == "corrupt":
                    assert 5 not in flat and all(len(b) == 2 for b in epoch)
            assert r["resumed"] == r["epochs"][0] and r["next"] == r["epochs"][1]
        # nothing but a rank's last batch or two is dropped for the other's sake
        got = {i for r in (r0, r1) for b in r["epochs"][0] for i in b}
        assert len(got) >= (4 if name == "corrupt" else 6), (name, got)
