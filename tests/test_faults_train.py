"""Faults around `seqpar train` runs: signals, a stalled rank, one run per output directory,
one-line CLI errors and a two-agent torchrun launch.

Every run is a real `python -m seqpar train` subprocess on a tiny model (2 local gloo
processes unless stated), so these tests see what a user or a scheduler sees: exit codes,
stderr lines, surviving processes (found by scanning /proc for the launcher's descendants).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seqpar.data import stdlib_corpus
from seqpar.train import TrainConfig

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and POSIX signals")

TINY = ["--config", "tiny", "--seq-len", "64", "--dim", "32", "--n-layers", "1", "--no-plot",
        "--no-progress", "--eval-every", "0"]
LONG = ["--steps", "100000", "--checkpoint-every", "100000"]  # runs until stopped; saves only when stopped
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(stdlib_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=60_000))


def seqpar_train(*args):
    return [sys.executable, "-m", "seqpar", "train", *args]


def start(out: Path, data: str, *extra: str, tmpdir: Path | None = None) -> tuple[subprocess.Popen, Path]:
    """Start a run in the background; stderr goes to a file (returned)."""
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.stderr"
    env = {**ENV, **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
    proc = subprocess.Popen(seqpar_train(*TINY, "--data", data, "--out-dir", str(out), *extra),
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
    return proc, log


def wait_for_training(proc: subprocess.Popen, out: Path, log: Path, timeout: float = 180) -> None:
    """Until metrics.jsonl holds a train record (the workers are in the training loop)."""
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and '"train"' in metrics.read_text():
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no training record within {timeout} s: {log.read_text()[-3000:]}")


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


_SEEN: set[int] = set()  # every worker pid a test saw, killed at the end if one survived a failure


@pytest.fixture(scope="module", autouse=True)
def _no_leftovers():
    yield
    for pid in alive(_SEEN):
        os.kill(pid, signal.SIGKILL)


def descendants(pid: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = int(st[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    _SEEN.update(found)
    return found


def alive(pids) -> set[int]:
    """The pids that still run (zombies count as gone)."""
    return {p for p in pids if (st := _stat(p)) is not None and st[0] != "Z"}


def wait_gone(pids, timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pids)


def wait_exit(proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until proc exits (fails the test, killing it, after `timeout`)."""
    t0 = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in alive(descendants(proc.pid)) | {proc.pid}:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"still running {timeout} s after the signal")
    return time.monotonic() - t0


def lines(text: str, prefix: str = "seqpar train:") -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def train_steps(out: Path) -> list[int]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in records if r["type"] == "train"]


# -- item 6: signals -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sigterm_run(data, tmp_path_factory):
    """A run stopped by SIGTERM; while it trains, a second run into the same --out-dir is tried."""
    out = tmp_path_factory.mktemp("sigterm") / "run"
    proc, log = start(out, data, *LONG)
    wait_for_training(proc, out, log)
    second = subprocess.run(seqpar_train(*TINY, "--data", data, "--out-dir", str(out), "--steps", "2"),
                            capture_output=True, text=True, timeout=60, env=ENV)
    workers = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    wait_exit(proc, 60)
    return {"out": out, "rc": proc.returncode, "stderr": log.read_text(), "workers": workers,
            "survivors": wait_gone(workers, 2), "second": second}


def test_sigterm_checkpoints_and_stops_every_worker(sigterm_run):
    r = sigterm_run
    assert r["rc"] == 128 + signal.SIGTERM, r["stderr"][-2000:]
    assert len(r["workers"]) >= 2 and not r["survivors"]
    (line,) = [x for x in lines(r["stderr"]) if "SIGTERM" in x]
    step = int(line.split(" at step ")[1].split(";")[0])
    ckpt = r["out"] / "checkpoints" / f"step_{step:08d}"
    assert f"stopped by SIGTERM at step {step}; checkpoint {ckpt} (resume with --resume latest)" in line
    assert (ckpt / "meta.json").is_file() and json.loads((ckpt / "meta.json").read_text())["step"] == step
    assert train_steps(r["out"]) == list(range(1, step + 1))  # nothing after the checkpoint, nothing lost
    assert not (r["out"] / "seqpar.lock").exists()


def test_sigterm_to_one_worker_stops_every_rank_at_the_same_step(data, tmp_path):
    """A scheduler preempting one node signals only that node's workers: the others learn of it
    through the per-step stop agreement (a MAX all-reduce), every rank stops after the same
    step, and the checkpoint is written and named as for a SIGTERM to the launcher."""
    out, tmpdir = tmp_path / "run", tmp_path / "tmp"
    tmpdir.mkdir()
    proc, log = start(out, data, *LONG, tmpdir=tmpdir)
    wait_for_training(proc, out, log)
    (beat,) = tmpdir.glob("seqpar-train-*/heartbeat_rank1.json")
    workers = descendants(proc.pid)
    os.kill(json.loads(beat.read_text())["pid"], signal.SIGTERM)  # rank 1 only, not rank 0, not the launcher
    wait_exit(proc, 60)
    stderr = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    (line,) = [x for x in lines(stderr) if "SIGTERM" in x]
    step = int(line.split(" at step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step_{step:08d}" / "meta.json").is_file()
    assert train_steps(out) == list(range(1, step + 1)) and not wait_gone(workers, 5)


def test_resume_after_sigterm_notes_the_lr_schedule(sigterm_run, data):
    """The SIGTERM checkpoint loads; changing --steps on resume says what happens to the LR schedule."""
    out = sigterm_run["out"]
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    step = json.loads((latest / "meta.json").read_text())["step"]
    proc = subprocess.run(seqpar_train(*TINY, "--data", data, "--out-dir", str(out), "--resume", "latest",
                                       "--steps", str(step + 2), "--checkpoint-every", "100000"),
                          capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (note,) = [x for x in lines(proc.stderr) if "note:" in x]
    assert f"--steps 100000 -> {step + 2}" in note and "LR schedule" in note and f"step {step + 1}" in note
    assert train_steps(out) == list(range(1, step + 3))


def test_sigint_stops_promptly_without_orphans(data, tmp_path):
    out = tmp_path / "run"
    proc, log = start(out, data, *LONG)
    wait_for_training(proc, out, log)
    workers = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    wait_exit(proc, 60)
    stderr = log.read_text()
    assert proc.returncode == 130, stderr[-2000:]
    assert len(workers) >= 2 and not wait_gone(workers, 2)
    (line,) = [x for x in lines(stderr) if "SIGINT" in x]
    assert "stopped by SIGINT at step" in line and "no checkpoint saved" in line and "send SIGTERM" in line
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


@pytest.fixture(scope="module")
def sigkilled_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sigkill") / "run"
    proc, log = start(out, data, *LONG)
    wait_for_training(proc, out, log)
    workers = descendants(proc.pid)
    # one worker frozen, so the other sits inside a collective waiting for it: neither can run a
    # Python signal handler, only a kernel-delivered SIGKILL ends them
    frozen = min(p for p in workers if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text())
    os.kill(frozen, signal.SIGSTOP)
    time.sleep(1)
    proc.kill()
    proc.wait()
    t0 = time.monotonic()
    survivors = wait_gone(workers, 10)
    for pid in survivors:  # do not leave them behind if the test fails
        os.kill(pid, signal.SIGKILL)
    return {"out": out, "workers": workers, "survivors": survivors, "seconds": time.monotonic() - t0}


def test_sigkill_of_the_launcher_leaves_no_workers(sigkilled_run):
    """Even with a worker frozen and the other blocked in a collective, all are gone within 10 s."""
    assert len(sigkilled_run["workers"]) >= 2 and not sigkilled_run["survivors"]


def test_torchrun_sigterm_checkpoints(data, tmp_path):
    """Under torchrun the agent forwards SIGTERM; the workers checkpoint and rank 0 names it."""
    out = tmp_path / "run"
    log = tmp_path / "torchrun.stderr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "seqpar",
           "train", *TINY, *LONG, "--data", data, "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=ENV)
    wait_for_training(proc, out, log)
    workers = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    wait_exit(proc, 60)
    stderr = log.read_text()
    assert proc.returncode != 0 and not wait_gone(workers, 5)
    (line,) = [x for x in lines(stderr) if "SIGTERM" in x]
    step = int(line.split(" at step ")[1].split(";")[0])
    assert f"checkpoint {out / 'checkpoints' / f'step_{step:08d}'}" in line
    assert (out / "checkpoints" / f"step_{step:08d}" / "meta.json").is_file()


# -- item 7: a stalled rank ---------------------------------------------------------------------------------
def test_stalled_rank_is_named_and_the_run_stopped(data, tmp_path):
    out, tmpdir = tmp_path / "run", tmp_path / "tmp"
    tmpdir.mkdir()
    proc, log = start(out, data, *LONG, "--stall-timeout", "5", tmpdir=tmpdir)
    wait_for_training(proc, out, log)
    (beat,) = tmpdir.glob("seqpar-train-*/heartbeat_rank1.json")
    victim = json.loads(beat.read_text())["pid"]
    workers = descendants(proc.pid)
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_exit(proc, 40)
    finally:
        if alive([victim]):
            os.kill(victim, signal.SIGKILL)
    stderr = log.read_text()
    assert proc.returncode == 1, stderr[-2000:]
    (line,) = [x for x in lines(stderr) if "stopped making progress" in x]
    assert f"rank 1 (pid {victim}," in line and "rank 0" not in line.split("stopped making progress")[0]
    assert not wait_gone(workers, 5)


def test_timeout_flags_are_validated():
    for bad in ({"timeout": 0.0}, {"stall_timeout": -1.0}, {"stop_grace": 0.0}):
        with pytest.raises(ValueError, match="timeout > 0"):
            TrainConfig.of(**bad).validate(world=4)


# -- item 10: one run per output directory ------------------------------------------------------------------
def test_concurrent_run_into_the_same_out_dir_is_refused(sigterm_run):
    """Refused with one line before anything is spawned (the first run's log stays its own)."""
    second = sigterm_run["second"]
    assert second.returncode == 2
    (line,) = second.stderr.strip().splitlines()
    assert "is in use by pid" in line and socket.gethostname() in line and "seqpar.lock" in line


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_lock_is_taken_over(tmp_path):
    from seqpar.train.control import RunLock
    lock_path = tmp_path / "seqpar.lock"
    lock_path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with RunLock(tmp_path) as lock:
        assert "took over the stale lock" in lock.note
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
        with pytest.raises(ValueError, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not lock_path.exists()
    lock_path.write_text(json.dumps({"pid": _dead_pid(), "host": "some-other-host"}))  # cannot tell: refuse
    with pytest.raises(ValueError, match="some-other-host"):
        RunLock(tmp_path).acquire()


def test_lock_left_by_a_killed_launcher_is_taken_over(sigkilled_run, data):
    out = sigkilled_run["out"]
    assert (out / "seqpar.lock").exists()  # the launcher had no chance to remove it
    proc = subprocess.run(seqpar_train(*TINY, "--data", data, "--out-dir", str(out), "--steps", "1",
                                       "--checkpoint-every", "0"),
                          capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([x for x in lines(proc.stderr) if "took over the stale lock" in x]) == 1
    assert not (out / "seqpar.lock").exists()


# -- item 11: one-line CLI errors before anything is spawned ------------------------------------------------
@pytest.fixture(scope="module")
def big_vocab_data(tmp_path_factory):
    import numpy as np

    from seqpar.data import write_token_file
    path = tmp_path_factory.mktemp("tokens") / "t.bin"
    write_token_file(path, np.arange(5000) % 1000, vocab_size=1000)
    return str(path)


CLI_ERRORS = [
    ("out_dir_is_a_file", ["--out-dir", "{file}"], "is a file, not a directory"),
    ("ulysses_heads", ["--strategy", "ulysses", "--nproc", "4", "--dim", "40", "--n-heads", "5", "--n-kv-heads", "5"],
     "Ulysses degree 4 must divide the number of attention heads (5)"),
    ("usp_heads", ["--strategy", "usp", "--nproc", "4", "--ulysses", "4", "--n-heads", "6", "--n-kv-heads", "2",
                   "--dim", "48"], "Ulysses degree 4 must divide the number of attention heads (6)"),
    ("wallfacer_teams", ["--strategy", "wallfacer", "--nproc", "4", "--team-size", "4"], "team_size=4 needs C^2=16"),
    ("unknown_kernel", ["--kernel", "nope"], "unknown attention kernel 'nope'"),
    ("data_vocab", ["--data", "{tokens}"], "needs vocab_size >= 1000, the model has 256"),
    ("bad_timeout", ["--timeout", "0"], "need timeout > 0"),
    ("chunked_blocks_strategy", ["--chunked-blocks", "--strategy", "ring"], "--chunked-blocks is FPDT's pipeline"),
    ("chunked_blocks_checkpointing", ["--chunked-blocks", "--strategy", "fpdt", "--activation-checkpointing"],
     "use --offload-activations, not --activation-checkpointing"),
    ("separator_not_in_vocab", ["--doc-separator", "256"], "doc_separator 256 is not a token id"),
    ("separator_absent", ["--doc-separator", "7"], "document separator 7 never occurs"),
    ("separator_unpacked", ["--doc-separator", "7", "--no-pack-documents"], "needs a token id >= 0 (-1: none) and "
     "--pack-documents"),
]


@pytest.mark.parametrize("name,args,message", CLI_ERRORS, ids=[c[0] for c in CLI_ERRORS])
def test_cli_errors_are_one_line_before_any_worker(tmp_path, data, big_vocab_data, monkeypatch, capsys, name, args,
                                                   message):
    """One line, exit code 2, and no worker process started (`seqpar train` run in this process,
    with the launcher's process start replaced by a failure)."""
    from seqpar import cli
    from seqpar.train import launch

    def no_workers(*_args, **_kwargs):
        raise AssertionError("a worker process was started")

    monkeypatch.setattr(launch, "start_ranks", no_workers)
    (tmp_path / "file").write_text("not a directory")
    args = [a.format(file=tmp_path / "file", tokens=big_vocab_data) for a in args]
    out = [] if "--out-dir" in args else ["--out-dir", str(tmp_path / "out")]
    given = [] if "--data" in args else ["--data", data]
    rc = cli.main(["train", *TINY, *given, *out, *args])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    (line,) = err.strip().splitlines()
    assert line.startswith("seqpar train: error: ") and message in line


def test_resume_note_names_the_schedule_change(tmp_path):
    from seqpar.train.launch import resume_note
    ckpt = tmp_path / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_bytes(b"")
    (ckpt / "meta.json").write_text(json.dumps({"step": 10, "config": {"steps": 20, "warmup": 2, "lr": 3e-3,
                                                                       "min_lr": 3e-4}}))
    (tmp_path / "checkpoints" / "latest").write_text("step_00000010\n")
    cfg = TrainConfig.of(out_dir=str(tmp_path), resume="latest", steps=40, warmup=2, lr=3e-3, min_lr=3e-4)
    note = resume_note(cfg)
    assert "--steps 20 -> 40" in note and "from step 11" in note and "\n" not in note
    assert resume_note(TrainConfig.of(out_dir=str(tmp_path), resume="latest", steps=20, warmup=2)) is None
    assert "nothing left to train" in resume_note(TrainConfig.of(out_dir=str(tmp_path), resume="latest", steps=10))


# -- item 12: two torchrun agents ("nodes") on this machine -------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_agents_reproduce_the_local_launch(data, tmp_path):
    """wallfacer over 2 "nodes" x 2 processes (ranks per node from LOCAL_WORLD_SIZE) == --nproc 4 locally."""
    common = [*TINY, "--data", data, "--strategy", "wallfacer", "--layout", "zigzag", "--dtype", "float64",
              "--steps", "3", "--checkpoint-every", "0"]
    port = _free_port()
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                                str(node), "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                                f"127.0.0.1:{port}", "--rdzv-id", "faults", "-m", "seqpar", "train", *common,
                                "--out-dir", str(tmp_path / "torchrun")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
              for node in (0, 1)]
    local = subprocess.run(seqpar_train(*common, "--nproc", "4", "--out-dir", str(tmp_path / "local")),
                           capture_output=True, text=True, timeout=240, env=ENV)
    errs = [a.communicate(timeout=240)[1] for a in agents]
    assert all(a.returncode == 0 for a in agents), errs[0][-2000:] + errs[1][-2000:]
    assert local.returncode == 0, local.stderr[-2000:]

    def losses(out):
        return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if r["type"] == "train"]

    got, ref = losses(tmp_path / "torchrun"), losses(tmp_path / "local")
    assert len(got) == len(ref) == 3
    assert all(abs(a - b) <= 1e-9 * abs(b) for a, b in zip(got, ref)), (got, ref)
    context = json.loads((tmp_path / "torchrun" / "config.json").read_text())["context"]
    assert context["size"] == 4 and context["ranks_per_node"] == 2 and context["collectives_intra_node"]
