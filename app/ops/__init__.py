"""Operations tooling: render the nginx and Prometheus configs shipped in `nginx/` and `monitoring/` from `.env`."""
