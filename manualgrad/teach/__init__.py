"""Teaching: ``manualgrad explain`` (:mod:`~manualgrad.teach.explain`), ``manualgrad exercise`` and
``grade`` (:mod:`~manualgrad.teach.exercise`, the forwards its files show in
:mod:`~manualgrad.teach.forwards`; whole networks in :mod:`~manualgrad.teach.networks` and
:mod:`~manualgrad.teach.network_grading`), the README's rules table (:mod:`~manualgrad.teach.docs`)
and the side-by-side tables of ``comparisons/`` (:mod:`~manualgrad.teach.compare`)."""
