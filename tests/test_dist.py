"""Training and evaluation under torchrun (2 gloo processes on the CPU) against one process.

Each test spawns torchrun as a user would; the runs are the embedded base's LoRA fine-tune, small
enough that a 2-process run takes a few seconds."""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import eval as evaluation
import retuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One micro-batch per process and two in the single process: both sum the same two gradients, so
# the runs agree to rounding. (With more micro-batches per process the sums associate differently,
# and Adam, which divides by the gradients' size, carries that rounding on: 2.5e-5 in the loss
# over 30 steps with 4 micro-batches of 4.)
FLAGS = ["--task", "addition", "--steps", "50", "--lora-dropout", "0", "--lora-r", "8", "--batch-size", "16",
         "--micro-batch-size", "8", "--n-examples", "480", "--warmup", "3", "--eval-every", "0", "--save-every", "10"]


def torchrun(*args, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:  # its own process group, so a Ctrl-C can reach all of it as from a terminal
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def losses(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def adapter(run):
    return load_file(os.path.join(run, "adapter", "adapter_model.safetensors"))


def assert_same_run(a, b):
    assert losses(a) == pytest.approx(losses(b), abs=1e-5)
    ours, theirs = adapter(a), adapter(b)
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, one thread, as each torchrun process runs (the same kernels)."""
    run = str(tmp_path_factory.mktemp("dist") / "single")
    p = subprocess.run([sys.executable, "retuning.py", "train", *FLAGS, "--out", run], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert p.returncode == 0, p.stderr
    return run


def test_two_processes_train_the_single_process_run(single, tmp_path):
    """Each process takes half of every batch (the global batch size is kept) and DDP sums their
    gradients: the 50 losses and the adapter are the one-process run's."""
    run = str(tmp_path / "pair")
    p = torchrun("retuning.py", "train", *FLAGS, "--out", run)
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(losses(run)) == 50
    assert json.load(open(os.path.join(run, "summary.json")))["processes"] == 2
    assert_same_run(run, single)
    assert not os.path.exists(os.path.join(run, ".train.lock"))


def test_ctrl_c_stops_both_processes_at_one_step_and_one_process_resumes_to_the_same_run(single, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) stops every process after
    the step in flight; rank 0 saves a whole checkpoint; a single process resumes it to the end."""
    run = str(tmp_path / "interrupted")
    job = torchrun("retuning.py", "train", *FLAGS, "--out", run, wait=False)
    metrics = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + 120
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3) and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGINT)
    out, _ = job.communicate(timeout=120)
    assert "stopped at step" in out, out
    ckpt = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    assert 3 <= ckpt["step"] < 50 and len(losses(run)) == ckpt["step"]
    retuning.main(["train", *FLAGS, "--out", run, "--resume"])
    assert_same_run(run, single)


def test_eval_under_two_processes_writes_the_single_process_tables(tmp_path):
    """On a committed run (a trained model: no near-ties between tokens for rounding to flip, as an
    untrained one has), each process decoding half of each length's problems."""
    run = os.path.join(ROOT, "results", "runs", "addition-retuning")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    evaluation.main([run, "--lengths", "1-3,6", "--per-length", "5", "--by-step", "--by-context", "--out", one])
    p = torchrun("eval.py", run, "--lengths", "1-3,6", "--per-length", "5", "--by-step", "--by-context", "--out", two)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "every context: kind / size" in open(os.path.join(one, "results.md")).read()
    assert open(os.path.join(two, "results.md")).read() == open(os.path.join(one, "results.md")).read()
    a, b = (json.load(open(os.path.join(d, "results.json")))["runs"] for d in (one, two))
    for r in a + b:
        r.pop("seconds")
    assert a == b and os.path.exists(os.path.join(two, "addition.png"))
    assert p.stdout.count("first failures") <= 1  # rank 0 alone prints


# ----------------------------------------------------------------------------- faults
TINY = ["--base", "scratch", "--dim", "32", "--n-layers", "2", "--n-heads", "2", "--batch-size", "8",
        "--n-examples", "400", "--eval-every", "0", "--save-every", "1"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_second_process_on_a_run_folder_in_use_is_refused_and_the_first_finishes(tmp_path, capsys):
    """The folder is locked while a run trains in it: another `train`, even with --overwrite or
    --resume, is refused with one line and touches nothing; the first run ends whole."""
    run = str(tmp_path / "busy")
    cmd = [sys.executable, "retuning.py", "train", *FLAGS[:3], "80", *FLAGS[4:], "--out", run]
    first = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(run, "metrics.jsonl")
    while not os.path.exists(metrics) and first.poll() is None:
        time.sleep(0.01)
    for extra in ([], ["--overwrite"], ["--resume"]):
        with pytest.raises(SystemExit) as e:
            retuning.main(["train", *FLAGS, "--out", run, *extra])
        assert e.value.code == 2 and f"{run} is in use by another training process (pid {first.pid})" in one_error_line(capsys)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert len(losses(run)) == 80 and os.path.exists(os.path.join(run, "adapter", "adapter_model.safetensors"))


def test_a_failed_checkpoint_write_is_one_line_and_the_previous_checkpoint_resumes(tmp_path, capsys):
    """A file-size limit (as a full disk) while saving: one line naming the file, and the checkpoint
    before it is whole, so --resume continues from it."""
    run = str(tmp_path / "full")
    retuning.main(["train", "--task", "parity", *TINY, "--steps", "2", "--out", run])
    ckpt = os.path.join(run, "checkpoint.pt")
    limit = os.path.getsize(ckpt) // 2
    p = subprocess.run([sys.executable, "retuning.py", "train", "--task", "parity", *TINY, "--steps", "4", "--resume",
                        "--out", run], cwd=ROOT, capture_output=True, text=True,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr and err.startswith(f"error: could not write {ckpt}"), p.stderr
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    capsys.readouterr()
    retuning.main(["train", "--task", "parity", *TINY, "--steps", "4", "--resume", "--out", run])
    assert torch.load(ckpt, weights_only=True)["step"] == 4 and len(losses(run)) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_the_gpu_check_says_in_one_line_that_there_is_no_gpu():
    p = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == "" and len(p.stderr.splitlines()) == 1 and "no CUDA device" in p.stderr
