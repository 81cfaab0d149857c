#!/usr/bin/env bash
# Operator entrypoint for the compose kit: run it on every rented VM (cp .env.example .env; edit; ./deploy-ray.sh all).
# Every container runs a `python -m app ...` entrypoint; this script only picks profiles, checks the VM and calls
# docker compose. --dry-run prints each docker/compose/curl/ssh command instead of running it.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
COMPOSE_FILE="$ROOT/docker-compose-ray.yml"
VENV=${VENV:-"$ROOT/.venv"}
DOCKER=${DOCKER:-docker}

ALL_PROFILES=(--profile head --profile worker --profile worker-cpu --profile monitoring --profile deepspeed)
DRY_RUN=0
MONITORING_FLAG=0
WORKERS=""
HEAD_WORKER=0
LLMKIT_UID=1000  # the head image's user (compose/Dockerfile.head): fallback and ray-head write HF_CACHE_DIR as it
ENV_FILE_ARG=""
OPEN_TUNNEL=0
ENGINE=""
ARGS=()

usage() {
  cat <<'EOF'
usage: deploy-ray.sh [flags] [COMMAND [args]]     (flags without a command: all)

Commands (run on each VM, from the repository folder):
  all                 head VM (NODE_IP == HEAD_IP): ray-head + fallback + nginx + batch (+ monitoring with
                      --with-monitoring, + a GPU worker on the head with --head-worker); worker VM: ray-worker
                      (NUM_GPUS > 0) or ray-worker-cpu (NUM_GPUS=0)
  head                ray-head, fallback, nginx, batch (+ monitoring with --with-monitoring)
  worker              ray-worker (GPU reservation NUM_GPUS) or ray-worker-cpu (NUM_GPUS=0); joins HEAD_IP:RAY_GCS_PORT
  deploy [CONFIG...]  apply model configs (default: MODEL_CONFIGS) on the head
  status              containers, cluster nodes, deployments, replicas, engines, GPUs
  test [MODEL]        a real chat request through nginx and through Ray Serve directly
  logs [SERVICE...]   follow container logs
  down                stop and remove this VM's containers
  deepspeed           DeepSpeed TP mode: deepspeed-node here, plus the launcher when this VM is first in DS_HOSTS
  tunnel USER@HOST    print (with --open: run) the ssh -N -L line for API, dashboard, Prometheus, Grafana
  local               no-Docker local cluster on 127.0.0.1 (sets up .venv, serves the tiny model; with
                      --engine vllm: vLLM's CPU build from .venv-vllm, app/configs/tiny-vllm.yaml)
  local-down          stop the local cluster
  k8s-render [OPTS]   write Kubernetes manifests (KubeRay RayService, ...) from this .env and MODEL_CONFIGS into
                      ./k8s (or --out DIR); every option after it goes to `python -m app k8s render` (see --help)
  demo                narrated walkthrough on the local cluster

Flags:
  --workers N         worker VMs the head expects (RAY_EXPECTED_WORKERS): deploy, and a restarted head's redeploy,
                      wait until N worker nodes joined; status shows how many did
  --head-worker       also run a GPU worker on the head VM (its own Ray port block, RAY_WORKER_* variables)
  --with-monitoring   also start Prometheus + Grafana + nginx exporter (profile monitoring) on the head
  --env-file F        environment file (default: .env next to this script)
  --dry-run           print every docker/compose command, run none
  --open              tunnel: open the tunnel instead of printing it
  --engine E          local: transformers (default) or vllm
  -h, --help          this help
EOF
}

die() { echo "error: $*" >&2; exit 1; }
info() { printf '==> %s\n' "$*"; }
# fail "problem" "one-line fix"
fail() { printf 'preflight: %s\n  fix: %s\n' "$1" "$2" >&2; exit 1; }
say() { printf '==> %s\n' "$*"; }

# run CMD...: execute, or print it (shell-quoted) under --dry-run.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

compose() {
  run "$DOCKER" compose --env-file "$ENV_FILE" -f "$COMPOSE_FILE" "$@"
}

parse_args() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --workers) [ $# -ge 2 ] || die "--workers needs a number"; WORKERS=$2; shift 2 ;;
      --workers=*) WORKERS=${1#*=}; shift ;;
      --with-monitoring) MONITORING_FLAG=1; shift ;;
      --head-worker) HEAD_WORKER=1; shift ;;
      --env-file) [ $# -ge 2 ] || die "--env-file needs a path"; ENV_FILE_ARG=$2; shift 2 ;;
      --env-file=*) ENV_FILE_ARG=${1#*=}; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      --open) OPEN_TUNNEL=1; shift ;;
      --engine) [ $# -ge 2 ] || die "--engine needs transformers or vllm"; ENGINE=$2; shift 2 ;;
      --engine=*) ENGINE=${1#*=}; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; ARGS+=("$@"); break ;;
      -*) die "unknown flag $1 (see -h)" ;;
      *) ARGS+=("$1"); shift
         # k8s-render's own options (--out, --monitoring, ...) belong to `python -m app k8s render`
         if [ "${ARGS[0]}" = k8s-render ]; then ARGS+=("$@"); break; fi ;;
    esac
  done
  case "$ENGINE" in ""|transformers|vllm) ;; *) die "--engine $ENGINE: use transformers or vllm" ;; esac
  if [ -n "$WORKERS" ] && ! [[ "$WORKERS" =~ ^[0-9]+$ ]]; then die "--workers needs a number, got '$WORKERS'"; fi
  return 0
}

# load_env: read KEY=VALUE lines of the env file into the environment. As in docker compose, a later line wins
# over an earlier one; values exported before this script ran win over the file.
load_env() {
  ENV_FILE=${ENV_FILE_ARG:-"$ROOT/.env"}
  [ -f "$ENV_FILE" ] || fail "$ENV_FILE not found" "cp $ROOT/.env.example $ROOT/.env and edit it (HEAD_IP, NODE_IP, RAY_AUTH_TOKEN, ...)"
  ENV_FILE=$(cd "$(dirname "$ENV_FILE")" && pwd)/$(basename "$ENV_FILE")
  export ENV_FILE
  local line key value var
  local -A preset=()
  while IFS= read -r var; do preset[$var]=1; done < <(compgen -e)
  while IFS= read -r line || [ -n "$line" ]; do
    [[ "$line" =~ ^[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
    key=${BASH_REMATCH[1]}; value=${BASH_REMATCH[2]}
    value=${value%\"}; value=${value#\"}; value=${value%\'}; value=${value#\'}
    if [ -z "${preset[$key]+x}" ]; then export "$key=$value"; fi
  done < "$ENV_FILE"
}

require_vars() {
  local var
  for var in "$@"; do
    if [ "$var" = RAY_AUTH_TOKEN ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
      fail "RAY_AUTH_TOKEN is empty in $ENV_FILE (every Ray node must present the same token)" \
        "$(token_fix)   (then copy the same value to every VM)"
    fi
    [ -n "${!var:-}" ] || fail "$var is not set in $ENV_FILE" "add $var=... to $ENV_FILE (see .env.example)"
  done
}

# token_fix: the one-line fix for a missing/empty RAY_AUTH_TOKEN (edit the line in place: the first occurrence
# of a variable must not stay empty while a later one is appended).
token_fix() {
  if grep -q '^RAY_AUTH_TOKEN=' "$ENV_FILE"; then
    echo "sed -i 's/^RAY_AUTH_TOKEN=.*/RAY_AUTH_TOKEN=$(new_token)/' $ENV_FILE"
  else
    echo "echo RAY_AUTH_TOKEN=$(new_token) >> $ENV_FILE"
  fi
}

new_token() {
  if command -v openssl >/dev/null 2>&1; then openssl rand -hex 32
  else python3 -c 'import secrets; print(secrets.token_hex(32))'; fi
}

check_docker() {
  command -v "$DOCKER" >/dev/null 2>&1 \
    || fail "docker not found" "install Docker Engine: curl -fsSL https://get.docker.com | sh"
  "$DOCKER" compose version >/dev/null 2>&1 \
    || fail "docker compose v2 not available" "apt-get install docker-compose-plugin (v1 'docker-compose' is not enough)"
}

check_gpu_runtime() {
  "$DOCKER" info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia \
    || fail "the NVIDIA container runtime is not configured in Docker" \
      "apt-get install nvidia-container-toolkit && nvidia-ctk runtime configure --runtime=docker && systemctl restart docker"
}

# check_gpu_count: NUM_GPUS must match the GPUs nvidia-smi sees (0 = CPU worker, no GPU needed).
check_gpu_count() {
  local want=${NUM_GPUS:-0} have
  [ "$want" = 0 ] && return 0
  if [ "$DRY_RUN" = 1 ]; then echo "# would check that nvidia-smi lists $want GPU(s)"; return; fi
  command -v nvidia-smi >/dev/null 2>&1 \
    || fail "NUM_GPUS=$want but nvidia-smi is not installed" "install the NVIDIA driver, or set NUM_GPUS=0 in $ENV_FILE (CPU worker)"
  have=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  [ "$have" = "$want" ] \
    || fail "NUM_GPUS=$want in $ENV_FILE but this VM has $have GPU(s)" "set NUM_GPUS=$have in $ENV_FILE"
}

# check_worker_drain: Compose must wait longer than Ray's SIGTERM drain, or `down` kills the drain (and every
# stream on the VM) at the stop grace period. Durations: seconds, or Compose's 45s / 1m30s form.
check_worker_drain() {
  local drain=${WORKER_DRAIN_TIMEOUT_S:-30} grace=${WORKER_STOP_GRACE_PERIOD:-45s} rest secs=0 n unit
  [[ "$drain" =~ ^[0-9]+$ ]] || fail "WORKER_DRAIN_TIMEOUT_S=$drain in $ENV_FILE is not a whole number of seconds" \
    "set WORKER_DRAIN_TIMEOUT_S=30 (0 = no drain)"
  rest=$grace
  [[ "$rest" =~ ^[0-9]+$ ]] && rest="${rest}s"
  while [[ "$rest" =~ ^([0-9]+)(h|m|s)(.*)$ ]]; do
    n=${BASH_REMATCH[1]} unit=${BASH_REMATCH[2]} rest=${BASH_REMATCH[3]}
    case "$unit" in h) secs=$((secs + n * 3600)) ;; m) secs=$((secs + n * 60)) ;; s) secs=$((secs + n)) ;; esac
  done
  if [ -n "$rest" ]; then
    fail "WORKER_STOP_GRACE_PERIOD=$grace in $ENV_FILE is not a duration" "set it in seconds or as 45s / 1m30s"
  fi
  [ "$drain" = 0 ] || [ "$secs" -ge $((drain + 10)) ] \
    || fail "WORKER_STOP_GRACE_PERIOD=$grace in $ENV_FILE is not 10 s longer than WORKER_DRAIN_TIMEOUT_S=$drain: \
\`down\` would kill the worker in the middle of its drain and cut its in-flight requests" \
      "set WORKER_STOP_GRACE_PERIOD=$((drain + 15))s (or lower WORKER_DRAIN_TIMEOUT_S)"
}

# check_node_ip: NODE_IP must be an address of this VM (a .env copied unedited from the head must not start a head).
check_node_ip() {
  if [ "$DRY_RUN" = 1 ]; then echo "# would check that NODE_IP $NODE_IP is an address of this VM"; return; fi
  local addrs
  addrs=$(ip -o addr show 2>/dev/null | awk '{split($4, a, "/"); print a[1]}' || hostname -I 2>/dev/null | tr ' ' '\n')
  grep -qxF "$NODE_IP" <<< "$addrs" \
    || fail "NODE_IP=$NODE_IP in $ENV_FILE is not an address of this VM (its addresses: $(echo "$addrs" | grep -v '^127\.\|^::1$' | tr '\n' ' '))" \
      "set NODE_IP to this VM's private address in $ENV_FILE (ip -br addr)"
}

# check_hf_cache: HF_CACHE_DIR must be writable by the image user (uid 1000); a missing one is created for it
# (Docker would create it root-owned and the fallback's download would fail).
check_hf_cache() {
  local dir=${HF_CACHE_DIR:-$ROOT/.cache/hf}
  [[ "$dir" = /* ]] || fail "HF_CACHE_DIR=$dir is relative" "set HF_CACHE_DIR to an absolute path in $ENV_FILE"
  if [ "$DRY_RUN" = 1 ]; then echo "# would check that $dir exists and uid $LLMKIT_UID can write it"; return; fi
  if [ ! -d "$dir" ]; then
    { mkdir -p "$dir" && chown "$LLMKIT_UID:$LLMKIT_UID" "$dir" 2>/dev/null; } \
      || fail "cannot create $dir owned by uid $LLMKIT_UID" "sudo install -d -o $LLMKIT_UID -g $LLMKIT_UID $dir"
    say "created $dir (owner uid $LLMKIT_UID, the containers' user)"
    return
  fi
  # the container sees the folder itself (bind mount), not its parents: owner uid 1000 with u+w, or o+w
  local owner mode
  read -r owner mode < <(stat -c '%u %a' "$dir")
  mode=$(printf '%03d' "$mode")
  { { [ "$owner" = "$LLMKIT_UID" ] && [ $(( ${mode: -3:1} & 2 )) -ne 0 ]; } || [ $(( ${mode: -1} & 2 )) -ne 0 ]; } \
    || fail "HF_CACHE_DIR $dir is not writable by uid $LLMKIT_UID (the fallback's and ray-head's user)" \
    "sudo chown -R $LLMKIT_UID:$LLMKIT_UID $dir"
}

# check_nginx_bind: an API reachable beyond loopback needs API keys.
check_nginx_bind() {
  case "${NGINX_BIND:-127.0.0.1}" in
    127.*|localhost) return 0 ;;
  esac
  [ -n "${API_KEYS:-}" ] || fail "NGINX_BIND=${NGINX_BIND} exposes the API beyond this VM, but API_KEYS is empty" \
    "set API_KEYS=<key1,key2> in $ENV_FILE (or NGINX_BIND=127.0.0.1 and use the SSH tunnel)"
}

check_ds_key() {
  local key=${DS_SSH_KEY_FILE:-$ROOT/.ssh/ds_ssh_key}
  { [ -f "$key" ] && [ -f "$key.pub" ]; } \
    || fail "DeepSpeed ssh key $key (and $key.pub) not found" \
      "ssh-keygen -t ed25519 -N '' -f $key   (copy the same pair to every DeepSpeed VM)"
}

# check_head_reachable: a worker VM must reach HEAD_IP:RAY_GCS_PORT (bounded: 5 s).
check_head_reachable() {
  local port=${RAY_GCS_PORT:-6379}
  if [ "$DRY_RUN" = 1 ]; then echo "# would check that $HEAD_IP:$port accepts TCP (5 s timeout)"; return; fi
  timeout 5 bash -c "exec 3<>/dev/tcp/$HEAD_IP/$port" 2>/dev/null \
    || fail "cannot reach the head at $HEAD_IP:$port" \
      "start the head first (./deploy-ray.sh all on $HEAD_IP) and open TCP $port from $NODE_IP in the firewall"
}

# running_services: this VM's compose services that are running now (their own ports are not "in use").
running_services() {
  "$DOCKER" compose --env-file "$ENV_FILE" -f "$COMPOSE_FILE" ps --services --status running 2>/dev/null || true
}

# check_ports_free SERVICE:PORT...: a port is busy unless the kit's own SERVICE already listens there.
check_ports_free() {
  local item port svc running
  if [ "$DRY_RUN" = 1 ]; then echo "# would check that ports ${*//*:/} are free (or held by the kit's own services)"; return; fi
  command -v ss >/dev/null 2>&1 || return 0
  running=" $(running_services | tr '\n' ' ') "
  for item in "$@"; do
    svc=${item%%:*}; port=${item##*:}
    [[ "$running" == *" $svc "* ]] && continue
    if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
      fail "port $port is already in use on this VM" "stop what listens there (ss -ltnp 'sport = :$port') or change it in $ENV_FILE"
    fi
  done
}

preflight() {  # preflight ROLE: head | worker | any
  local role=$1
  check_docker
  require_vars HEAD_IP NODE_IP RAY_AUTH_TOKEN
  check_node_ip
  case "$role" in
    head)
      require_vars FALLBACK_MODEL
      check_nginx_bind
      check_hf_cache
      check_ports_free "ray-head:${RAY_GCS_PORT:-6379}" "ray-head:${SERVE_PORT:-8000}" "fallback:${FALLBACK_PORT:-8001}" \
        "nginx:${NGINX_PORT:-8080}" "ray-head:${RAY_DASHBOARD_PORT:-8265}" "ray-head:${SERVE_PROXY_PORT:-8004}" \
        "batch:${BATCH_PORT:-8005}"
      ;;
    worker)
      require_vars NUM_GPUS
      check_worker_drain
      check_gpu_count
      if [ "${NUM_GPUS}" != 0 ]; then check_gpu_runtime; fi
      check_head_reachable
      ;;
  esac
}

is_head_vm() { [ "${NODE_IP:-}" = "${HEAD_IP:-}" ]; }

monitoring_profile() {
  if [ "${WITH_MONITORING:-0}" = 1 ]; then echo "--profile monitoring"; fi
}

# worker_profile: GPU worker (NVIDIA reservation) or, with NUM_GPUS=0, the CPU worker.
worker_profile() {
  if [ "${NUM_GPUS:-0}" = 0 ]; then echo worker-cpu; else echo worker; fi
}

# The head VM's own GPU worker (--head-worker) gets its own block of Ray ports (head and worker share the host
# network): every RAY_WORKER_* variable unset in .env defaults to the head's port + 100 (worker range after it).
export_head_worker_ports() {
  local var base
  for var in OBJECT_MANAGER_PORT:8076 NODE_MANAGER_PORT:8077 DASHBOARD_AGENT_GRPC_PORT:8078 \
    RUNTIME_ENV_AGENT_PORT:8079 METRICS_EXPORT_PORT:8090 DASHBOARD_AGENT_LISTEN_PORT:52365; do
    base="RAY_${var%%:*}"
    local def=${var##*:}
    local cur=${!base:-$def}
    local wvar="RAY_WORKER_${var%%:*}"
    export "$wvar=${!wvar:-$((cur + 100))}"
  done
  local max=${RAY_MAX_WORKER_PORT:-10100}
  export RAY_WORKER_MIN_WORKER_PORT=${RAY_WORKER_MIN_WORKER_PORT:-$((max + 1))}
  export RAY_WORKER_MAX_WORKER_PORT=${RAY_WORKER_MAX_WORKER_PORT:-$((max + 1 + max - ${RAY_MIN_WORKER_PORT:-10002}))}
}

cmd_head() {
  preflight head
  local profiles=(--profile head)
  if [ "$HEAD_WORKER" = 1 ]; then
    require_vars NUM_GPUS
    check_gpu_count
    if [ "${NUM_GPUS}" != 0 ]; then check_gpu_runtime; fi
    export_head_worker_ports
    profiles+=(--profile "$(worker_profile)")
  fi
  if [ -n "$WORKERS" ]; then export RAY_EXPECTED_WORKERS=$WORKERS; fi
  # shellcheck disable=SC2207
  profiles+=($(monitoring_profile))
  say "head VM $NODE_IP: starting ${profiles[*]} (expecting ${RAY_EXPECTED_WORKERS:-0} worker VM(s))"
  compose "${profiles[@]}" up -d --build
}

cmd_worker() {
  [ -z "$WORKERS" ] || die "--workers is for the head VM (it tells the head how many worker VMs to expect)"
  preflight worker
  local profile
  profile=$(worker_profile)
  say "worker VM $NODE_IP: joining $HEAD_IP:${RAY_GCS_PORT:-6379} with ${NUM_GPUS} GPU(s) (profile $profile)"
  compose --profile "$profile" up -d --build
}

cmd_all() {
  require_vars HEAD_IP NODE_IP
  if is_head_vm; then cmd_head; else cmd_worker; fi
}

cmd_deploy() {
  check_docker
  is_head_vm || die "deploy runs on the head VM ($HEAD_IP); this VM is $NODE_IP"
  local configs=("$@")
  # names relative to MODEL_CONFIG_DIR (mounted read-only at /etc/llmkit/models in ray-head)
  if [ ${#configs[@]} -eq 0 ]; then IFS=',' read -r -a configs <<< "${MODEL_CONFIGS:-qwen2.5-0.5b.yaml}"; fi
  compose exec ray-head python -m app cluster deploy "${configs[@]}"
}

cmd_status() {
  check_docker
  compose ps
  if is_head_vm; then compose exec ray-head python -m app cluster status; fi
  if command -v nvidia-smi >/dev/null 2>&1; then run nvidia-smi --query-gpu=index,name,memory.used,memory.total,utilization.gpu --format=csv; fi
}

chat_body() {
  printf '{"model":"%s","messages":[{"role":"user","content":"Say hello in five words."}],"max_tokens":32}' "$1"
}

# client_host ADDR: where a local client reaches a server bound to ADDR (0.0.0.0 -> loopback).
client_host() {
  case "$1" in 0.0.0.0|'') echo 127.0.0.1 ;; *) echo "$1" ;; esac
}

cmd_test() {
  local model=${1:-${CLUSTER_MODEL:-${FALLBACK_SERVED_MODEL_NAME:-qwen2.5-0.5b-instruct}}}
  local key=${API_KEYS%%,*} auth=()
  if [ -n "$key" ]; then auth=(-H "Authorization: Bearer $key"); fi
  local url
  # the addresses nginx (NGINX_BIND) and the Serve proxy (SERVE_HOST) bind: the same variables the services read
  for url in "http://$(client_host "${NGINX_BIND:-127.0.0.1}"):${NGINX_PORT:-8080}"     "http://$(client_host "${SERVE_HOST:-127.0.0.1}"):${SERVE_PORT:-8000}"; do
    say "chat request to $url (model $model)"
    run curl -fsS --max-time 120 "${auth[@]}" -H 'Content-Type: application/json' \
      -d "$(chat_body "$model")" "$url/v1/chat/completions"
    [ "$DRY_RUN" = 1 ] || echo
  done
}

cmd_logs() {
  check_docker
  compose "${ALL_PROFILES[@]}" logs -f --tail 200 "$@"
}

cmd_down() {
  check_docker
  compose "${ALL_PROFILES[@]}" down --remove-orphans
}

cmd_deepspeed() {
  check_docker
  require_vars NODE_IP DS_HOSTS DS_MODEL
  check_node_ip
  check_ds_key
  if [ "${DS_DEVICE:-cuda}" != cpu ]; then check_gpu_runtime; fi
  local first=${DS_HOSTS%%,*}
  first=${first%%:*}
  compose --profile deepspeed up -d --build deepspeed-node
  if [ "$first" = "$NODE_IP" ]; then compose --profile deepspeed up -d deepspeed; fi
}

cmd_tunnel() {
  local target=${1:-}
  [ -n "$target" ] || die "usage: deploy-ray.sh tunnel USER@HEAD_PUBLIC_IP"
  local serve_host
  serve_host=$(client_host "${SERVE_HOST:-127.0.0.1}")
  local cmd=(ssh -N
    -L "${NGINX_PORT:-8080}:$(client_host "${NGINX_BIND:-127.0.0.1}"):${NGINX_PORT:-8080}"
    -L "${SERVE_PORT:-8000}:$serve_host:${SERVE_PORT:-8000}"
    -L "${RAY_DASHBOARD_PORT:-8265}:127.0.0.1:${RAY_DASHBOARD_PORT:-8265}"
    -L "${PROMETHEUS_PORT:-9090}:127.0.0.1:${PROMETHEUS_PORT:-9090}"
    -L "${GRAFANA_PORT:-3000}:127.0.0.1:${GRAFANA_PORT:-3000}"
    "$target")
  echo "API http://127.0.0.1:${NGINX_PORT:-8080}/v1  Ray Serve :${SERVE_PORT:-8000}  dashboard :${RAY_DASHBOARD_PORT:-8265}  Prometheus :${PROMETHEUS_PORT:-9090}  Grafana :${GRAFANA_PORT:-3000}"
  if [ "$OPEN_TUNNEL" = 1 ]; then run "${cmd[@]}"; else printf '%q ' "${cmd[@]}"; echo; fi
}

# setup_venv: the venv `local` runs from (about a minute the first time; each step says what it does, and a venv
# already holding this checkout's requirements is left alone)
setup_venv() {
  local py=${PYTHON:-python3.11} t0 stamp want lock
  command -v "$py" >/dev/null 2>&1 || py=python3
  stamp="$VENV/.llm-kit-local-stamp"
  lock="$ROOT/compose/locks/ci-constraints.txt"  # the versions the images run (python -m app locks)
  want=$(cat "$ROOT/pyproject.toml" "$ROOT/requirements-nodeps.txt" "$lock" | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import app, ray, torch" 2>/dev/null; then
    info "venv $VENV is up to date"
    return 0
  fi
  t0=$(date +%s)
  if [ ! -x "$VENV/bin/python" ]; then
    info "creating the venv $VENV ($py)"
    run "$py" -m venv "$VENV"
  fi
  info "[1/4] pip itself"
  run "$VENV/bin/python" -m pip install -q --upgrade pip
  info "[2/4] torch 2.13.0 (the CPU build where that is what pip finds: no CUDA download)"
  run "$VENV/bin/python" -m pip install -q -c "$lock" "torch==2.13.0"
  info "[3/4] the kit and Ray Serve (pip install -e .[ray])"
  run "$VENV/bin/python" -m pip install -q -c "$lock" -e "${ROOT}[ray]"
  info "[4/4] constrained decoding (xgrammar, without the triton it declares: requirements-nodeps.txt)"
  run "$VENV/bin/python" -m pip install -q --no-deps -c "$lock" -r "$ROOT/requirements-nodeps.txt"
  [ "$DRY_RUN" = 1 ] || echo "$want" > "$stamp"
  info "venv ready in $(( $(date +%s) - t0 )) s"
}

# cmd_local_vllm: the tiny model on vLLM's CPU build, from its own venv (tests/vllm_venv.sh builds it)
cmd_local_vllm() {
  VENV=${VLLM_VENV:-"$ROOT/.venv-vllm"}
  run env VLLM_VENV="$VENV" bash "$ROOT/tests/vllm_venv.sh"
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}
  cd "$ROOT"
  [ -f .cache/tiny-model/config.json ] || run "$VENV/bin/python" -m app make-tiny-model .cache/tiny-model
  if [ "$DRY_RUN" = 1 ]; then run "$VENV/bin/python" -m app cluster local-up --config app/configs/tiny-vllm.yaml "$@"; return; fi
  exec "$VENV/bin/python" -m app cluster local-up --config app/configs/tiny-vllm.yaml "$@"
}

cmd_local() {
  if [ "$ENGINE" = vllm ]; then cmd_local_vllm "$@"; return; fi
  setup_venv
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
  cd "$ROOT"
  # local-up builds and serves the tiny offline model unless --config names others; it prints the curl line.
  if [ "$DRY_RUN" = 1 ]; then run "$VENV/bin/python" -m app cluster local-up "$@"; return; fi
  exec "$VENV/bin/python" -m app cluster local-up "$@"
}

cmd_local_down() {
  run "$VENV/bin/python" -m app cluster local-down
}

# cmd_k8s_render: the same .env and model configs, rendered as a kustomize directory (kubectl apply -k DIR)
cmd_k8s_render() {
  cd "$ROOT"
  local out=()
  case " $* " in *" --out "*|*" --out="*|*" --help "*) ;; *) out=(--out "$ROOT/k8s") ;; esac
  run "${K8S_PYTHON:-$VENV/bin/python}" -m app k8s render --env-file "$ENV_FILE" "${out[@]}" "$@"
}

step() { printf '\n\033[1m### %s\033[0m\n' "$*"; }

# cmd_demo: narrated walkthrough on the no-Docker local cluster (127.0.0.1 only). Every step is a real command.
cmd_demo() {
  cd "$ROOT"
  DEMO_PY="$VENV/bin/python"
  local py=$DEMO_PY port=${SERVE_PORT:-8000} mport=${RAY_METRICS_EXPORT_PORT:-8090}
  local url="http://127.0.0.1:$port/v1/chat/completions" ct='Content-Type: application/json'
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
  step "1. Start a local Ray cluster on 127.0.0.1 serving the tiny offline model (python -m app cluster local-up)"
  run "$py" -m app cluster local-up
  [ "$DRY_RUN" = 1 ] || trap 'step "7. Stop the local cluster"; "$DEMO_PY" -m app cluster local-down' EXIT
  step "2. Cluster status: nodes, deployments, replicas and the engine each replica runs"
  run "$py" -m app cluster status
  step "3. A chat completion through Ray Serve (OpenAI wire format)"
  run curl -fsS --max-time 120 -H "$ct" -d "$(chat_body tiny)" "$url"
  step "4. The same request streamed (Server-Sent Events, one chunk per token)"
  run curl -fsSN --max-time 120 -H "$ct" -d "$(chat_body tiny | sed 's/}$/,"stream":true}/')" "$url"
  step "5. Metrics Ray exports for Prometheus (llm_* names, ray_ prefix stripped by the scrape config)"
  if [ "$DRY_RUN" = 1 ]; then
    run curl -fsS --max-time 10 "http://127.0.0.1:$mport/metrics"
  else
    # Ray flushes each process's metrics every few seconds, independently (the replica's decode-batch histogram
    # can appear before the ingress's request counters): poll (bounded) until the request counter appears.
    local found=""
    for _ in $(seq 1 20); do
      found=$(curl -fsS --max-time 10 "http://127.0.0.1:$mport/metrics" 2>/dev/null \
        | awk '/^(ray_)?llm_[a-z_]*(_total|_count)[{ ]/ { sub(/[{].*[}]/, ""); print }' || true)
      grep -q 'llm_requests_total' <<<"$found" && break
      sleep 1
    done
    echo "${found:-(no llm_* series exported yet)}"
  fi
  step "6. Kill a model replica under traffic, then crash the whole Ray cluster behind nginx: the fallback answers"
  run "$py" -m app ops demo-faults --serve-port "$port" --gcs-port "${RAY_GCS_PORT:-6379}"
}

main() {
  parse_args "$@"
  set -- "${ARGS[@]+"${ARGS[@]}"}"
  local sub=${1:-}
  if [ -z "$sub" ]; then
    # flags alone (./deploy-ray.sh --with-monitoring --workers 2) mean `all`; nothing at all prints the usage
    [ "$MONITORING_FLAG" = 1 ] || [ -n "$WORKERS" ] || [ "$HEAD_WORKER" = 1 ] || { usage >&2; exit 2; }
    sub=all
  else
    shift
  fi
  case "$sub" in
    local) cmd_local "$@"; return ;;
    local-down) cmd_local_down; return ;;
    demo) cmd_demo "$@"; return ;;
    help) usage; return ;;
  esac
  load_env
  if [ "$MONITORING_FLAG" = 1 ]; then export WITH_MONITORING=1; fi
  case "$sub" in
    head) cmd_head ;;
    worker) cmd_worker ;;
    all) cmd_all ;;
    deploy) cmd_deploy "$@" ;;
    status) cmd_status ;;
    test) cmd_test "$@" ;;
    logs) cmd_logs "$@" ;;
    down) cmd_down ;;
    deepspeed) cmd_deepspeed ;;
    tunnel) cmd_tunnel "$@" ;;
    k8s-render) cmd_k8s_render "$@" ;;
    *) echo "unknown command: $sub" >&2; usage >&2; exit 2 ;;
  esac
}

main "$@"
