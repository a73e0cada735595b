"""``manualgrad train``: the jitted training loop (:mod:`~manualgrad.train.loop`, whose
:func:`~manualgrad.train.loop.train` runs it), datasets (:mod:`~manualgrad.train.data`) and
checkpoints (:mod:`~manualgrad.train.checkpoint`)."""
