"""Start the stage actors inside one placement group, ranked explicitly, and stop them."""

from __future__ import annotations

from cluster.plan import JobPlan
from cluster.settings import JobSettings

PLACEMENT_TIMEOUT_S = 120
STRATEGIES = {"pack": "PACK", "spread": "SPREAD"}


def placement_strategy(settings: JobSettings) -> str:
    """Ray's placement group strategy for ``resources.placement`` (PACK unless spread is asked)."""
    try:
        return STRATEGIES[settings.placement]
    except KeyError:
        raise ValueError(f"resources.placement must be one of {', '.join(STRATEGIES)}, not {settings.placement!r}") from None


def start_stages(ray, settings: JobSettings, plan: JobPlan):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from workers.stage import StageWorker

    bundle = {"CPU": settings.cpus_per_worker}
    if settings.gpus_per_worker:
        bundle["GPU"] = settings.gpus_per_worker
    strategy = placement_strategy(settings)
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
    env = {} if settings.gpus_per_worker else {"runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}}
    stages = [
        actor.options(num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker or 0,
                      scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
                      name=None, **env).remote(settings.locations, [plan.units[i] for i in stage], rank == 0, all_units,
                                        max(1, int(settings.cpus_per_worker)))
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
