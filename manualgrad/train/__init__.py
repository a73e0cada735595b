"""``manualgrad train``: :func:`~manualgrad.train.loop.train` runs a
:class:`~manualgrad.train.config.Config` (its fields, defaults and validation) with the ready-made
models (:mod:`~manualgrad.train.models`) and the jitted step (:mod:`~manualgrad.train.step`), into
a run folder (:mod:`~manualgrad.train.runs`) with metrics, a plot and progress
(:mod:`~manualgrad.train.progress`), checkpoints (:mod:`~manualgrad.train.checkpoint`) and samples
(:mod:`~manualgrad.train.sampling`). Datasets come from :mod:`~manualgrad.train.data` (IDX files
through :mod:`~manualgrad.train.idx_format`), several processes join through
:mod:`~manualgrad.train.distributed`, and every refusal is one of :mod:`~manualgrad.train.errors`."""
