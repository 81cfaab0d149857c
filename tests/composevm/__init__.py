"""The compose-as-executed harness: runs docker-compose-ray.yml's services across emulated VMs.

images.py (image substitution), launch.py (a service's mount/PID namespace and exec), engine.py (the per-VM
"Docker engine": depends_on, healthchecks, restart policies, volumes), dockercli.py (the `docker` command on PATH
and the engine's socket server), cluster.py (network-namespace VMs driven from tests). See README "What the
compose harness proves".
"""
