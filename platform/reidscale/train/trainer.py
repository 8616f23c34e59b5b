"""The TorchTrainer reidscale fits: Ray Train's, with its placement group scoped to the job.

Ray Train V2 (2.5x-2.60) starts a detached ``PlacementGroupCleaner`` actor beside every run. Once
a second it asks the State API (the dashboard's HTTP server, which asks the GCS) whether the
run's controller is alive, and removes the run's placement group when the answer is "no". Two
things go wrong with it on a loaded machine:

- ``ray.train.v2._internal.state.util.is_actor_alive`` takes an empty answer for a dead
  controller, so the cleaner can remove the placement group of a live run, and Ray destroys its
  workers ("Destroying worker since its placement group was removed"). CI saw a 1-worker run die
  with exactly that message while the machine ran two test processes; an automated review on
  ray-project/ray#65447 points at the same line. ``max_failures`` does not help: the next
  group's placement group goes to the same cleaner.
- Every reply that times out prints "Failed to query Ray Train Controller actor state" on the
  user's console (11-12 lines per toy run with the two cores busy), and the poll itself costs the
  cleaner, the dashboard and the GCS CPU the training worker could use.

What the cleaner guards against cannot outlive a reidscale job: the controller is an actor the
job's driver owns, and a placement group that is not detached lives as long as its job (Ray's
own words in ray-project/ray#58515, which added the cleaner for nested drivers such as Tune
trials). If the controller dies, ``fit()`` raises in the driver, the job exits, and the group
goes with it (tests/test_ray_job_submit.py kills a driver mid-training and watches it go). So
this trainer leaves the cleaner out; everything else is Ray Train's default.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer

# Ray Train's internals: a release that moves them leaves the stock behaviour, which
# tests/test_trainer.py then reports
try:
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
except ImportError:
    DatasetsCallback = None
try:
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
except ImportError:  # a Ray Train from before the cleaner: nothing to leave out
    PlacementGroupCleanerCallback = None


class JobScopedTorchTrainer(TorchTrainer):
    """``ray.train.torch.TorchTrainer`` without the detached placement-group cleaner, nor the
    datasets callback when there are no datasets (module docstring).

    Ray Train builds its callbacks in the driver at ``fit()``; if a release stops doing it in
    this method, the override does nothing, and tests/test_trainer.py (which checks that the stock
    trainer still makes both and ours does not) fails.
    """

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        left_out = [PlacementGroupCleanerCallback]
        if not self.datasets:
            left_out.append(DatasetsCallback)
        left_out = tuple(cls for cls in left_out if cls is not None)
        return [cb for cb in callbacks if not isinstance(cb, left_out)]
