"""Growing to Kubernetes: render the VM kit's model configs and `.env` as a kustomize directory.

`catalogue` reads the tier catalogue (worker groups), `checks` refuses what cannot work (one line naming the
file and key), `ray` renders the KubeRay RayService, `core` the plain objects around it (Namespace, ConfigMap,
PVC, Services, NetworkPolicies, fallback and front door), `deepspeed` the MPIJob / LeaderWorkerSet, `compose`
reads images and entrypoints from the compose kit, `render` writes the tree and `cli` is `python -m app k8s`.
"""
