"""``moga bench``: verify moga against dense attention, then time it against the baselines.

Run ``moga bench`` (or ``python -m moga.bench``); ``--help`` lists the options. Modules: :mod:`.cases`
(problem sizes, group-size distributions), :mod:`.flops`, :mod:`.timing`, :mod:`.baselines`, :mod:`.methods`
(what is timed), :mod:`.check` (the correctness check), :mod:`.report` (table, JSON, plot), :mod:`.runner`.
"""

from moga.bench.runner import add_arguments, run

__all__ = ["add_arguments", "run"]
