"""Running on Ray clusters: Jobs API submission with a project runtime_env (see cluster/ for launchers)."""
