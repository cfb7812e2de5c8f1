"""Serve wing, cluster part: what an operator sets for a Ray Serve deployment — each default defined once.

No ray import here: `llm-serve --help` and the config checks read these without the `cluster` extra.
"""

from __future__ import annotations

from dataclasses import dataclass

# Requests a replica takes beyond its generation capacity (max_batch + max_queue) so that /ready, /metrics
# and /tokenize still reach a replica whose batch and queue are full; generations over capacity get the
# replica's own 429 (Admission), exactly as from `llm-serve run`.
PROBE_HEADROOM = 4


@dataclass(frozen=True)
class ClusterSettings:
    replicas: int = 2  # fixed replica count, unless min/max replicas turn autoscaling on
    min_replicas: int | None = None  # autoscaling on ongoing requests when both bounds are given
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None  # per replica, for the autoscaler (default: max_batch)
    prefix_affinity: bool = True  # Ray's PrefixCacheAffinityRouter; off: Ray's default power-of-two choices
    imbalance_threshold: int | None = None  # ongoing-request gap beyond which affinity yields (default: max_batch)
    max_queued_requests: int | None = None  # requests waiting at the ingress for a replica slot; beyond: 429
    num_cpus: float = 1.0  # Ray resources one replica reserves
    num_gpus: float = 0.0  # 1 for a TensorRT / CUDA replica: Ray places it on a GPU and sets CUDA_VISIBLE_DEVICES
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    proxy_location: str = "HeadOnly"  # one HTTP listener on the head; "EveryNode" for a load balancer in front

    def autoscaling(self, max_batch: int) -> dict | None:
        """Ray Serve's autoscaling_config, or None for a fixed count."""
        if self.min_replicas is None and self.max_replicas is None:
            return None
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
        return {"min_replicas": low, "max_replicas": high, "initial_replicas": min(max(self.replicas, low), high),
                "target_ongoing_requests": self.target_ongoing_requests or max_batch}
