"""Serve wing, cluster part: request routing — Ray's PrefixCacheAffinityRouter, kept off full replicas.

Ray's router (ray.llm, shipped in the `ray` wheel; ray.serve.llm would need the heavy `ray[llm]` extra, so
its module is imported by path, pinned with ray) sends a prompt to the replica whose earlier prompts share
the longest prefix with it, unless replicas' ongoing requests differ by more than `imbalanced_threshold`,
where it falls back to power-of-two choices. Two additions:
- a replica whose ongoing requests (Ray's cached count) reach the engine's capacity (max_batch + max_queue)
  is not a candidate while another has room: its own admission would answer 429 although the cluster is
  not full. Ray's max_ongoing_requests sits a little higher (settings.PROBE_HEADROOM), so probes still pass.
- affinity's pick yields to the least busy replica when busier by more than `imbalanced_threshold`, and of
  equals the least busy is taken, counting requests picked and not sent yet: Ray counts a request into a
  replica's queue length only once sent, so a burst routed at once saw every replica idle and went to the
  first (22 of 24 requests on one of two replicas, measured).
- the prefix tree outlives a redeploy and may name replicas that are gone: such a name is dropped.
- a request without a prompt (probes, /metrics, /tokenize of ids) is routed by power-of-two choices and not
  recorded: there is nothing to match (Ray's router would divide by its zero length).
`affinity=False` is plain power-of-two choices with the same capacity rule: the baseline the benchmark uses.
"""

from __future__ import annotations

import random

import ray
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter
from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter


def _prompt(pending_request) -> str:
    if pending_request is None or not pending_request.args:
        return ""
    return getattr(pending_request.args[0], "prompt", "") or ""


class PrefixAffinityRouter(PrefixCacheAffinityRouter):
    def initialize_state(self, capacity: int | None = None, affinity: bool = True, **prefix_kwargs):
        self._capacity, self._affinity = capacity, affinity
        self._threshold = prefix_kwargs.get("imbalanced_threshold", float("inf"))
        # Replicas chosen by affinity whose request is not sent yet: Ray counts a request into a replica's
        # queue length only once it is sent, so a burst routed at once would all see the same idle counts.
        self._picked: dict = {}
        if affinity:  # the prefix tree actor exists only when it is used
            super().initialize_state(**prefix_kwargs)

    def _queued(self, replica_id) -> int:
        """The replica's ongoing requests as Ray last saw them (0 before it has seen any)."""
        return self._replica_queue_len_cache.get(replica_id) or 0

    def _load(self, replica) -> int:
        return self._queued(replica.replica_id) + self._picked.get(replica.replica_id, 0)

    def _balanced(self, ranked: list, candidates: list) -> list:
        """Affinity's pick unless it is busier than the least busy replica by more than the threshold."""
        if not ranked or not ranked[0] or not candidates:
            return ranked
        least = min(self._load(r) for r in candidates)
        if min(self._load(r) for r in ranked[0]) - least <= self._threshold:
            return ranked
        return [[r for r in candidates if self._load(r) == least]]

    def on_send_request(self, replica_id):
        super().on_send_request(replica_id)
        if self._picked.get(replica_id):
            self._picked[replica_id] -= 1

    def _keep_room(self, ranked: list, candidates: list) -> list:
        """`ranked` (groups of replicas, best first) without the replicas known to be at capacity; all
        replicas with room when none of the ranked has any; `ranked` as it is when no replica has room
        (then the 429 is right). Ray's routers pick from every replica they know, whatever list they are
        given, so the rule is applied to what they chose."""
        if self._capacity is None:
            return ranked
        room = {r.replica_id for r in candidates if self._queued(r.replica_id) < self._capacity}
        if not room:
            return ranked
        kept = [group for group in ([r for r in group if r.replica_id in room] for group in ranked) if group]
        return kept or [[r for r in candidates if r.replica_id in room]]

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if self._affinity and _prompt(pending_request):
            ranked = await super().choose_replicas(candidate_replicas, pending_request)
            ranked = self._balanced(ranked, candidate_replicas)
        else:
            ranked = await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        ranked = self._keep_room(ranked, candidate_replicas)
        if not ranked or not ranked[0]:
            return ranked
        # One replica from the first group, the least busy counting picks not sent yet (Ray would take the
        # first of equal cached counts, and a burst sees them all equal), ties broken at random.
        best = min(ranked[0], key=lambda r: (self._load(r), random.random()))
        self._picked[best.replica_id] = self._picked.get(best.replica_id, 0) + 1
        return [[best], *ranked[1:]]

    async def _prefix_match_best_replicas(self, pending_request, candidate_replicas):
        try:
            return await super()._prefix_match_best_replicas(pending_request, candidate_replicas)
        except KeyError as exc:
            # The prefix tree is a detached actor per deployment name, shared by every router of it: after
            # a redeploy it still names replicas this router never saw. Dropped, and this request routed by
            # power-of-two choices.
            stale = exc.args[0]
            ray.get(self._tree_actor.remove_tenants.remote([stale.to_full_id_str()]))
            return [[]]

    def on_request_routed(self, pending_request, replica_id, result):
        if self._affinity and _prompt(pending_request):
            super().on_request_routed(pending_request, replica_id, result)

    def update_replicas(self, replicas):
        if self._affinity:
            return super().update_replicas(replicas)
        return super(PrefixCacheAffinityRouter, self).update_replicas(replicas)  # no tree to keep

    def on_replica_actor_died(self, replica_id):
        if self._affinity:
            return super().on_replica_actor_died(replica_id)
        return super(PrefixCacheAffinityRouter, self).on_replica_actor_died(replica_id)
