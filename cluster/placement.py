"""Start the stage actors inside one placement group, ranked explicitly, and stop them."""

from __future__ import annotations

from cluster.plan import JobPlan
from cluster.job import Job

PLACEMENT_TIMEOUT_S = 120
STRATEGIES = {"pack": "PACK", "spread": "SPREAD"}


def placement_strategy(job: Job) -> str:
    """Ray's placement group strategy for ``resources.placement`` (PACK unless spread is asked)."""
    try:
        return STRATEGIES[job.resources.placement]
    except KeyError:
        raise ValueError(f"resources.placement must be one of {', '.join(STRATEGIES)}, not {job.resources.placement!r}") from None


def start_stages(ray, job: Job, plan: JobPlan):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from workers.stage import StageWorker

    bundle = {"CPU": job.resources.cpus_per_worker}
    if job.resources.gpus_per_worker:
        bundle["GPU"] = job.resources.gpus_per_worker
    strategy = placement_strategy(job)
    pg = placement_group([dict(bundle) for _ in plan.stages], strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(
            f"could not place {len(plan.stages)} stage workers of {bundle} ({strategy}) within {PLACEMENT_TIMEOUT_S}s; "
            f"the cluster has {ray.cluster_resources()}: lower resources.workers or the per-worker resources")
    actor = ray.remote(StageWorker)
    all_units = [u.name for u in plan.units]
    # an actor that reserves no GPU would still see every GPU of its node: hide them, so it computes on the CPU
    env = {} if job.resources.gpus_per_worker else {"runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}}
    stages = [
        actor.options(num_cpus=job.resources.cpus_per_worker, num_gpus=job.resources.gpus_per_worker or 0,
                      scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
                      name=None, **env).remote(job.where, [plan.units[i] for i in stage], rank == 0, all_units,
                                        max(1, int(job.resources.cpus_per_worker)))
        for rank, stage in enumerate(plan.stages)
    ]
    try:
        return stages, pg, ray.get([s.ready.remote() for s in stages])
    except Exception:
        stop_stages(ray, stages, pg)  # a stage that cannot load its weights must not hold the cluster
        raise


def stop_stages(ray, stages, pg) -> None:
    from ray.util.placement_group import remove_placement_group

    for s in stages:
        ray.kill(s)
    remove_placement_group(pg)
