"""Canopy's pure aggregation core: no I/O, no Prefect, no cloud SDKs (a test enforces it).

* ``tensors``     - ``TensorDict`` and the safetensors codec, the only tensor wire format.
* ``partial``     - ``PartialAggregate``: pre-weighted sums that every tree node adds.
* ``accumulator`` - ``Accumulator``: sums many updates in place into one partial.
* ``guards``      - ``check_update``: refuses bad device updates before they are summed.
* ``norms``       - ``NormHistogram``: the summed updates' norms, summable up the tree.
* ``clipping``    - the default adaptive norm bound: a multiple of the median norm,
  carried from round to round (``NormBoundState``), warmed up per leaf in round 0 and
  checked across leaves (``AdaptiveNormBound.check_leaves``) before the tree adds them.
* ``strategies``  - FedAvg, FedAvgM, FedAdam, FedYogi, the registry of names and
  ``module:ATTR`` references, ``StrategyConfig`` and ``make_strategy``.
* ``cohort``, ``collector``, ``topology`` - round planning: cohort selection, a leaf's
  intake (dedup, task checks, guards, sum), the aggregation tree's shape.

See ``docs/aggregation.md``.
"""
