#!/usr/bin/env bash
# Runs sleep_jax jobs on Cloud TPU VMs: create, set up, run, watch, recreate after preemption, delete.
#
# Every remote command is built as one POSIX shell string in which each word that comes from the
# user is single-quoted, so the remote shell rebuilds exactly the argv given after `--`.
# The remote snippets below are meant to expand on the worker, not here:
# shellcheck disable=SC2016
set -euo pipefail

readonly SCRIPT_NAME=${0##*/}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME [--dry-run] COMMAND --name=NAME [options] [-- job command...]

Manage one TPU VM (single host or pod slice) and the job running on it.

Commands:
  create    Create the TPU VM (on-demand, --spot, and/or through --queued resources).
  setup     Install the project on every worker: copy the local checkout (--source=local,
            the default) or clone --repo at --ref, then pip install -e '.[tpu]' into
            ~/sleep_jax_venv (Python --python, provisioned with uv).
  run       Start the job command given after -- on every worker (--worker=all): processes
            still holding the TPU are killed first, the job runs under nohup in ~/sleep_jax,
            and each worker writes its own log ~/sleep_jax_logs/NAME.log.
  stop      Send SIGTERM to the job on every worker (it saves a checkpoint and exits).
  logs      Show the job log of one worker (--worker, default 0; --follow, --lines=N).
  ssh       Open a shell on a worker, or run the command given after -- there (in ~/sleep_jax).
  status    Describe the TPU VM (and its queued resource) and the job state on every worker.
  delete    Delete the TPU VM (with --queued: the queued resource and its node).
  babysit   Keep the job alive: poll the VM every --poll-interval seconds; if it is preempted
            or missing, delete it, create it again, set it up and rerun the job, which resumes
            from the latest checkpoint in its --workdir (use a gs:// workdir). A job that exits
            with an error is rerun too; at most --max-restarts reruns. Stops when the job exits 0
            (so 'stop' ends a babysat job for good only if the job exits 0 on SIGTERM).

Options (flags override the environment variables in brackets):
  --name=NAME            TPU VM name: lower-case letters, digits, '-'  [TPU_NAME]
  --zone=ZONE            e.g. us-central2-b, us-east5-a, europe-west4-a  [TPU_ZONE]
  --project=PROJECT      Google Cloud project (default: gcloud's configured one)  [TPU_PROJECT]
  --accelerator=TYPE     accelerator type, e.g. v5litepod-8 (v5e-8 is accepted as an alias),
                         v5p-64, v6e-16, v4-32 (default: v5litepod-8)  [TPU_ACCELERATOR]
  --version=VERSION      TPU runtime version (default per family: v6e v2-alpha-tpuv6e,
                         v5p v2-alpha-tpuv5, v5litepod v2-alpha-tpuv5-lite,
                         v2/v3/v4 tpu-ubuntu2204-base)  [TPU_VERSION]
  --spot                 create a Spot VM (cheaper, can be preempted at any time)
  --queued               create through a queued resource (waits for capacity)
  --create-flag=FLAG     extra flag for the create command, repeatable
                         (e.g. --create-flag=--network=my-net)
  --source=local|repo    what setup installs (default: local, or repo when --repo is given)
  --repo=URL             git URL to clone on the workers
  --ref=REF              branch, tag or commit to check out after cloning
  --python=3.X           Python version of the workers' virtual environment (default 3.12)
  --env=KEY=VALUE        environment variable for the job, repeatable
  --worker=W             worker(s) for ssh/logs/run/setup/stop/status: an index, 'all',
                         '1,3' or '0-3' (default: all for run/setup/stop/status, 0 for ssh/logs)
  --lines=N              lines of log to show (default 100)
  --follow               keep following the log
  --poll-interval=SEC    babysit and queued-resource polling period (default 60)
  --max-restarts=N       babysit gives up after N reruns of the job (default 20)
  --dry-run              print every gcloud command instead of running it; babysit prints the
                         commands of one iteration (as if the VM had been preempted) and exits
  -h, --help             show this help

Every value may also be written as '--flag VALUE'.

Examples:
  export TPU_NAME=sleep-v5p TPU_ZONE=us-east5-a TPU_ACCELERATOR=v5p-64
  $SCRIPT_NAME create --spot
  $SCRIPT_NAME setup
  $SCRIPT_NAME run -- python -m experiments.train \\
      --config=experiments/configs/multi_hop.py:PRESET --workdir=gs://my-bucket/multi_hop/n4
  $SCRIPT_NAME logs --follow
  $SCRIPT_NAME stop
  $SCRIPT_NAME babysit --spot -- python -m experiments.train \\
      --config=experiments/configs/multi_hop.py:PRESET --workdir=gs://my-bucket/multi_hop/n4
  $SCRIPT_NAME delete
EOF
}

# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

DRY_RUN=0
COMMAND=""
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
ACCELERATOR=${TPU_ACCELERATOR:-v5litepod-8}
VERSION=${TPU_VERSION:-}
SPOT=0
QUEUED=0
CREATE_FLAGS=()
SOURCE=""
REPO=""
REF=""
PYTHON_VERSION=3.12
ENV_VARS=()
WORKER=""
LINES=100
FOLLOW=0
POLL_INTERVAL=60
MAX_RESTARTS=20
JOB=()

die() {
  printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 2
}

note() {
  printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
}

set_option() {  # set_option FLAG VALUE
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator) ACCELERATOR=$2 ;;
    --version) VERSION=$2 ;;
    --create-flag) CREATE_FLAGS+=("$2") ;;
    --source) SOURCE=$2 ;;
    --repo) REPO=$2 ;;
    --ref) REF=$2 ;;
    --python) PYTHON_VERSION=$2 ;;
    --env) ENV_VARS+=("$2") ;;
    --worker) WORKER=$2 ;;
    --lines) LINES=$2 ;;
    --poll-interval) POLL_INTERVAL=$2 ;;
    --max-restarts) MAX_RESTARTS=$2 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
}

parse_args() {
  while (($#)); do
    case $1 in
      --)
        shift
        JOB=("$@")
        return
        ;;
      -h | --help | help)
        usage
        exit 0
        ;;
      --dry-run) DRY_RUN=1 ;;
      --spot) SPOT=1 ;;
      --queued) QUEUED=1 ;;
      --follow) FOLLOW=1 ;;
      --dry-run=* | --spot=* | --queued=* | --follow=*)
        die "${1%%=*} takes no value"
        ;;
      --*=*) set_option "${1%%=*}" "${1#*=}" ;;
      --*)
        (($# >= 2)) || die "option $1 needs a value"
        set_option "$1" "$2"
        shift
        ;;
      -*) die "unknown option '$1' (see --help)" ;;
      *)
        [[ -z $COMMAND ]] || die "unexpected argument '$1': put the job command after '--'"
        COMMAND=$1
        ;;
    esac
    shift
  done
}

validate_common() {
  [[ -n $NAME ]] || die "--name (or TPU_NAME) is required"
  [[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "--name must be 1-63 characters of lower-case letters, digits and '-', starting with a letter and not ending with '-'; got '$NAME'"
  [[ -n $ZONE ]] || die "--zone (or TPU_ZONE) is required, e.g. --zone=us-central2-b"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z0-9]+$ ]] || die "--zone must look like us-central2-b; got '$ZONE'"
  [[ -z $PROJECT || $PROJECT =~ ^[a-z][-a-z0-9.:]{3,62}$ ]] || die "--project is not a valid project id: '$PROJECT'"
  [[ -z $WORKER || $WORKER == all || $WORKER =~ ^[0-9]+([,-][0-9]+)*$ ]] ||
    die "--worker must be 'all', an index, a list like 1,3 or a range like 0-3; got '$WORKER'"
  [[ $LINES =~ ^[1-9][0-9]*$ ]] || die "--lines must be a positive integer; got '$LINES'"
  [[ $POLL_INTERVAL =~ ^[0-9]+$ ]] || die "--poll-interval must be a number of seconds >= 0; got '$POLL_INTERVAL'"
  [[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts must be an integer >= 0; got '$MAX_RESTARTS'"
  [[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "--python must look like 3.12; got '$PYTHON_VERSION'"
  local kv
  for kv in ${ENV_VARS[@]+"${ENV_VARS[@]}"}; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env must be KEY=VALUE with KEY a shell variable name; got '$kv'"
  done
}

validate_create() {
  if [[ $ACCELERATOR == v5e-* ]]; then
    ACCELERATOR=v5litepod-${ACCELERATOR#v5e-}
  fi
  [[ $ACCELERATOR =~ ^([a-z][a-z0-9]*)-([0-9]+)$ ]] ||
    die "--accelerator must be TYPE-SIZE such as v5litepod-8, v5p-64 or v6e-16; got '$ACCELERATOR'"
  local family=${BASH_REMATCH[1]}
  if [[ -z $VERSION ]]; then
    case $family in
      v6e) VERSION=v2-alpha-tpuv6e ;;
      v5p) VERSION=v2-alpha-tpuv5 ;;
      v5litepod) VERSION=v2-alpha-tpuv5-lite ;;
      v2 | v3 | v4) VERSION=tpu-ubuntu2204-base ;;
      *) die "--version is required for accelerator family '$family' (known: v6e, v5p, v5litepod, v2, v3, v4)" ;;
    esac
  fi
  [[ $VERSION =~ ^[-a-z0-9._]+$ ]] || die "--version is not a runtime version name: '$VERSION'"
}

validate_setup() {
  if [[ -z $SOURCE ]]; then
    if [[ -n $REPO ]]; then SOURCE=repo; else SOURCE=local; fi
  fi
  case $SOURCE in
    local) [[ -z $REPO ]] || die "--repo given with --source=local: drop one of them" ;;
    repo) [[ -n $REPO ]] || die "--source=repo needs --repo=URL" ;;
    *) die "--source must be 'local' or 'repo'; got '$SOURCE'" ;;
  esac
}

validate_job() {
  ((${#JOB[@]} > 0)) || die "$COMMAND needs a job command after '--', e.g. -- python -m experiments.train --config=... --workdir=gs://..."
}

# --------------------------------------------------------------------------------------------
# Quoting and command execution
# --------------------------------------------------------------------------------------------

# Sets REPLY to WORD single-quoted for any POSIX shell (a ' becomes '\'').
quote_word() {
  local word=$1
  printf -v REPLY "'%s'" "${word//\'/\'\\\'\'}"
}

# Sets REPLY to the words, each single-quoted, joined by spaces.
quote_words() {
  local out="" word
  for word in "$@"; do
    quote_word "$word"
    out+="${out:+ }$REPLY"
  done
  REPLY=$out
}

# Prints a command so that it can be pasted into a shell; words made only of safe
# characters stay bare for readability.
print_command() {
  local out="" word
  for word in "$@"; do
    if [[ -n $word && $word != *[!A-Za-z0-9_./:=@%+,-]* ]]; then
      out+="${out:+ }$word"
    else
      quote_word "$word"
      out+="${out:+ }$REPLY"
    fi
  done
  # fd 3 is the real stdout, so commands print even from inside $(...).
  printf '%s\n' "$out" >&3
}

execute() {
  if ((DRY_RUN)); then
    print_command "$@"
  else
    "$@"
  fi
}

# Sets the array GCLOUD to a gcloud compute tpus command with the project flag.
gcloud_tpus() {
  GCLOUD=(gcloud compute tpus "$@")
  if [[ -n $PROJECT ]]; then
    GCLOUD+=("--project=$PROJECT")
  fi
}

# Runs a command string on the given workers.
remote() {  # remote WORKER SCRIPT
  gcloud_tpus tpu-vm ssh "$NAME" "--zone=$ZONE" "--worker=$1" "--command=$2"
  execute "${GCLOUD[@]}"
}

# --------------------------------------------------------------------------------------------
# Remote scripts
# --------------------------------------------------------------------------------------------

readonly REMOTE_ENV='export PATH="$HOME/sleep_jax_venv/bin:$PATH"; '

# Kills whatever still holds the TPU (a crashed or older job keeps /dev/accel* on v4 and
# /dev/vfio/* on v5e/v5p/v6e open, and the next job then cannot start).
readonly KILL_STALE='killed=0; if command -v fuser >/dev/null 2>&1; then '\
'sudo fuser -s -k /dev/accel* /dev/vfio/* 2>/dev/null && killed=1; '\
'else pids=$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u); '\
'if [ -n "$pids" ]; then sudo kill -9 $pids; killed=1; fi; fi; '\
'if [ "$killed" = 1 ]; then echo "killed stale TPU processes on $(hostname)"; sleep 3; fi; '\
'sudo rm -f /tmp/libtpu_lockfile; '

run_script() {
  local script=$REMOTE_ENV kv job
  for kv in ${ENV_VARS[@]+"${ENV_VARS[@]}"}; do
    quote_word "$kv"
    script+="export $REPLY; "
  done
  quote_words "${JOB[@]}"
  job=$REPLY
  script+='mkdir -p "$HOME/sleep_jax_logs" && cd "$HOME/sleep_jax" || '\
'{ echo "sleep_jax is not set up on $(hostname): run setup first" >&2; exit 1; }; '
  script+=$KILL_STALE
  script+="log=\"\$HOME/sleep_jax_logs/$NAME\"; "
  script+='rm -f "$log.exit"; '
  script+='{ printf "=== %s %s start:" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(hostname)"; '
  script+="printf ' %s' $job; echo; } >> \"\$log.log\"; "
  # sh -c '"$@"' runs the argv exactly as given and records its exit status in $0 (through a
  # rename, so that a reader never sees a half-written file).
  script+="nohup sh -c '\"\$@\"; echo \$? > \"\$0.tmp\" && mv \"\$0.tmp\" \"\$0\"' \"\$log.exit\" $job >> \"\$log.log\" 2>&1 < /dev/null & "
  script+='echo $! > "$log.pid"; echo "started on $(hostname) (pid $!), log: $log.log"'
  REPLY=$script
}

job_state_script() {
  REPLY="log=\"\$HOME/sleep_jax_logs/$NAME\"; "
  REPLY+='if [ -f "$log.exit" ]; then echo "exited $(cat "$log.exit")"; '
  REPLY+='elif [ -f "$log.pid" ] && kill -0 "$(cat "$log.pid")" 2>/dev/null; then echo running; '
  REPLY+='else echo absent; fi'
}

setup_script() {
  local script='set -e; cd "$HOME"; rm -rf sleep_jax; '
  if [[ $SOURCE == local ]]; then
    script+='mkdir sleep_jax; tar -xzf sleep_jax_src.tar.gz -C sleep_jax; rm -f sleep_jax_src.tar.gz; '
  else
    quote_word "$REPO"
    script+="git clone --quiet $REPLY sleep_jax; "
    if [[ -n $REF ]]; then
      quote_word "$REF"
      script+="git -C sleep_jax checkout --quiet $REPLY; "
    fi
  fi
  # uv provides the requested Python even where the image ships an older one.
  script+='if ! command -v uv >/dev/null 2>&1 && [ ! -x "$HOME/.local/bin/uv" ]; then '\
'python3 -m pip install --user --quiet uv || '\
'python3 -m pip install --user --quiet --break-system-packages uv; fi; '
  script+='uv=$(command -v uv || echo "$HOME/.local/bin/uv"); '
  script+="[ -x sleep_jax_venv/bin/python ] || \"\$uv\" venv --quiet --python $PYTHON_VERSION sleep_jax_venv; "
  script+='cd sleep_jax; "$uv" pip install --quiet --python "$HOME/sleep_jax_venv/bin/python" -e '"'.[tpu]'; "
  script+='"$HOME/sleep_jax_venv/bin/python" -c "import jax, sleep_jax; print(jax.__version__)" >/dev/null; '
  script+='echo "sleep_jax ready on $(hostname)"'
  REPLY=$script
}

# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

create_node() {
  local args
  if ((QUEUED)); then
    args=(queued-resources create "$NAME" "--zone=$ZONE" "--accelerator-type=$ACCELERATOR"
      "--runtime-version=$VERSION" "--node-id=$NAME")
  else
    args=(tpu-vm create "$NAME" "--zone=$ZONE" "--accelerator-type=$ACCELERATOR" "--version=$VERSION")
  fi
  if ((SPOT)); then args+=(--spot); fi
  args+=(${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"})
  gcloud_tpus "${args[@]}"
  execute "${GCLOUD[@]}" || return
}

delete_node() {
  if ((QUEUED)); then
    gcloud_tpus queued-resources delete "$NAME" "--zone=$ZONE" --quiet --force
  else
    gcloud_tpus tpu-vm delete "$NAME" "--zone=$ZONE" --quiet
  fi
  execute "${GCLOUD[@]}" || return
}

# Prints one state word for the resource: the describe output, MISSING when it does not
# exist, UNKNOWN when gcloud failed for another reason (network, quota of API calls).
describe_state() {  # describe_state queued-resources|tpu-vm FIELD
  gcloud_tpus "$1" describe "$NAME" "--zone=$ZONE" "--format=value($2)"
  if ((DRY_RUN)); then
    print_command "${GCLOUD[@]}"
    echo PREEMPTED
    return
  fi
  local out errors state rc=0
  errors=$(mktemp)
  out=$("${GCLOUD[@]}" 2>"$errors") || rc=$?
  if ((rc == 0)); then
    state=${out##*$'\n'}
  elif grep -qiE 'NOT_FOUND|not found' "$errors"; then
    state=MISSING
  fi
  rm -f "$errors"
  echo "${state:-UNKNOWN}"
}

node_state() {
  if ((QUEUED)); then
    local queued_state
    queued_state=$(describe_state queued-resources state.state)
    case $queued_state in
      ACTIVE) ;;
      SUSPENDED | FAILED) echo PREEMPTED; return ;;
      *) echo "$queued_state"; return ;;
    esac
  fi
  describe_state tpu-vm state
}

wait_for_queued_resource() {
  local state
  while true; do
    state=$(describe_state queued-resources state.state)
    ((DRY_RUN)) && return 0
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | MISSING)
        note "queued resource $NAME is $state"
        return 1
        ;;
    esac
    note "queued resource $NAME is $state; checking again in ${POLL_INTERVAL}s"
    sleep "$POLL_INTERVAL"
  done
}

cmd_create() {
  validate_create
  create_node || return
  if ((QUEUED)); then
    wait_for_queued_resource || return
  fi
}

cmd_setup() {
  validate_setup
  setup_script
  local script=$REPLY worker=${WORKER:-all}
  if [[ $SOURCE == local ]]; then
    local tarball="${TMPDIR:-/tmp}/sleep_jax-$NAME-src.tar.gz"
    if ((DRY_RUN)); then
      note "would archive the checkout at $REPO_ROOT (tracked and untracked, not ignored files) into $tarball"
    else
      make_tarball "$tarball" || return
    fi
    gcloud_tpus tpu-vm scp "$tarball" "$NAME:sleep_jax_src.tar.gz" "--zone=$ZONE" "--worker=$worker"
    local rc=0
    execute "${GCLOUD[@]}" || rc=$?
    ((DRY_RUN)) || rm -f "$tarball"
    ((rc == 0)) || return "$rc"
  fi
  remote "$worker" "$script" || return
}

make_tarball() {
  local out=$1
  if git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$REPO_ROOT" &&
      git ls-files -z --cached --others --exclude-standard |
      tar --null --ignore-failed-read -T - -czf "$out")
  else
    tar -C "$REPO_ROOT" --exclude=.git --exclude=.venv --exclude=__pycache__ -czf "$out" .
  fi
}

cmd_run() {
  validate_job
  run_script
  remote "${WORKER:-all}" "$REPLY" || return
}

cmd_stop() {
  # The job is the child of the recording shell started by run: signal only the job, so that
  # the shell still records its exit status.
  local script="log=\"\$HOME/sleep_jax_logs/$NAME\"; "
  script+='if [ -f "$log.exit" ]; then echo "no job running on $(hostname) (exited with status $(cat "$log.exit"))"; '
  script+='elif [ -f "$log.pid" ] && pkill -TERM -P "$(cat "$log.pid")"; then echo "sent SIGTERM to the job on $(hostname)"; '
  script+='else echo "no job running on $(hostname)"; fi'
  remote "${WORKER:-all}" "$script"
}

cmd_logs() {
  local tail_flags="-n $LINES"
  if ((FOLLOW)); then tail_flags+=" -F"; fi
  remote "${WORKER:-0}" "tail $tail_flags \"\$HOME/sleep_jax_logs/$NAME.log\" | sed -u \"s/^/[\$(hostname)] /\""
}

cmd_ssh() {
  if ((${#JOB[@]} == 0)); then
    gcloud_tpus tpu-vm ssh "$NAME" "--zone=$ZONE" "--worker=${WORKER:-0}"
    execute "${GCLOUD[@]}"
  else
    quote_words "${JOB[@]}"
    remote "${WORKER:-0}" "${REMOTE_ENV}cd \"\$HOME/sleep_jax\" 2>/dev/null; $REPLY"
  fi
}

cmd_status() {
  if ((QUEUED)); then
    gcloud_tpus queued-resources describe "$NAME" "--zone=$ZONE"
    execute "${GCLOUD[@]}" || true
  fi
  gcloud_tpus tpu-vm describe "$NAME" "--zone=$ZONE" \
    "--format=yaml(name,state,health,acceleratorType,runtimeVersion,schedulingConfig)"
  execute "${GCLOUD[@]}" || return
  job_state_script
  remote "${WORKER:-all}" "echo \"\$(hostname): \$($REPLY)\"" || true
}

cmd_delete() {
  delete_node
}

# Prints the job state on worker 0: running, absent, "exited N" or unknown.
job_state() {
  job_state_script
  gcloud_tpus tpu-vm ssh "$NAME" "--zone=$ZONE" --worker=0 "--command=$REPLY"
  local out
  if out=$("${GCLOUD[@]}" 2>/dev/null); then
    out=${out##*$'\n'}
    echo "${out:-unknown}"
  else
    echo unknown
  fi
}

start_job() {
  cmd_setup || return
  cmd_run || return
}

cmd_babysit() {
  validate_create
  validate_setup
  validate_job
  if ((DRY_RUN)); then
    note "dry run: one babysit iteration, as if the VM had been preempted"
    node_state >/dev/null
    delete_node
    cmd_create
    start_job
    return 0
  fi
  local state job restarts=0 started=0
  while true; do
    state=$(node_state)
    case $state in
      READY)
        job=$(job_state)
        case $job in
          running) ;;
          "exited 0")
            note "job finished on $NAME"
            return 0
            ;;
          absent | exited*)
            if ((started)); then
              if ((restarts >= MAX_RESTARTS)); then
                note "giving up: the job needed more than --max-restarts=$MAX_RESTARTS restarts (last state: $job)"
                return 1
              fi
              restarts=$((restarts + 1))
              note "job is $job on $NAME; restart $restarts of at most $MAX_RESTARTS"
            fi
            started=1
            if [[ $job == absent ]]; then
              start_job || note "starting the job failed; retrying after ${POLL_INTERVAL}s"
            else
              cmd_run || note "rerunning the job failed; retrying after ${POLL_INTERVAL}s"
            fi
            ;;
          *) note "could not read the job state on $NAME ($job); checking again" ;;
        esac
        ;;
      PREEMPTED | TERMINATED | STOPPED | MISSING)
        note "$NAME is $state: recreating it"
        if [[ $state != MISSING ]]; then
          delete_node || note "delete failed; will retry"
        fi
        if create_node; then
          continue
        fi
        note "create failed (capacity?); retrying after ${POLL_INTERVAL}s"
        ;;
      *) note "$NAME is $state; waiting" ;;
    esac
    sleep "$POLL_INTERVAL"
  done
}

main() {
  exec 3>&1
  parse_args "$@"
  [[ -n $COMMAND ]] || {
    usage >&2
    exit 2
  }
  case $COMMAND in
    create | setup | run | stop | logs | ssh | status | delete | babysit) ;;
    *) die "unknown command '$COMMAND' (one of: create setup run stop logs ssh status delete babysit)" ;;
  esac
  validate_common
  if ((${#JOB[@]} > 0)) && [[ $COMMAND != run && $COMMAND != ssh && $COMMAND != babysit ]]; then
    die "$COMMAND takes no job command after '--'"
  fi
  "cmd_$COMMAND"
}

main "$@"
