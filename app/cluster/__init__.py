"""Cluster entrypoints: Ray head/worker nodes, deploying the Serve app, status, and the no-Docker local mode."""
