"""Teaching: ``manualgrad explain`` (:mod:`~manualgrad.teach.explain`), ``manualgrad exercise`` and
``grade`` (:mod:`~manualgrad.teach.exercise`), the README's rules table (:mod:`~manualgrad.teach.docs`)
and the side-by-side tables of ``comparisons/`` (:mod:`~manualgrad.teach.compare`)."""
