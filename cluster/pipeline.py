"""The job's stages as Ray actors, behind the :class:`qvlm.method.Pipeline` interface the method runs on.

A call is an actor method call and returns its object reference; a reference passed to a later call is
resolved by Ray on the receiving actor (a stage's hand-over goes from actor to actor, never through the
driver). An actor runs its calls one at a time in the order they were made, so a stage's captures, searches
and hand-overs happen in the sequence the method issues them.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence


class RayPipeline:
    def __init__(self, ray, actors: Sequence[Any]):
        self.ray, self.actors = ray, list(actors)
        self.n_stages = len(self.actors)

    def call(self, stage: int, method: str, *args: Any, returns: int = 1) -> Any:
        return getattr(self.actors[stage], method).options(num_returns=returns).remote(*args)

    def get(self, futures: Any) -> Any:
        return self.ray.get(futures)

    def completed(self, futures: Sequence[Any]) -> Iterable[tuple[Any, Any]]:
        pending = list(futures)
        while pending:
            ready, pending = self.ray.wait(pending, num_returns=1)
            yield ready[0], self.ray.get(ready[0])
