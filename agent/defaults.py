"""What `ffrtmp agent`'s parser shows and checks: the choices and defaults the agent's modules
act on, defined here (stdlib only) so that building the CLI's grammar imports none of them."""

from __future__ import annotations

CGROUP_MODES = ("auto", "v2", "v1", "none")  # --cgroup (agent.cgroups.detect.MODES)
LIMIT_POLICIES = ("required", "best-effort")  # --limits (agent.cgroups.limits.POLICIES)
METRICS_HOST, METRICS_PORT = "127.0.0.1", 9471  # the default --metrics (agent.metrics)
