"""`python -m tests.composevm docker ARGS | engine STATE VM | controller WORK SOCK VM...`."""

from __future__ import annotations

import sys


def main() -> int:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "docker":
        from tests.composevm.dockercli import docker_main

        return docker_main(args)
    if cmd == "engine":
        from tests.composevm.dockercli import run_engine_forever

        run_engine_forever(args[0], args[1])
        return 0
    if cmd == "controller":
        from tests.composevm.cluster import controller_main

        controller_main(args[0], args[1], args[2:])
        return 0
    print(f"unknown command {cmd}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
