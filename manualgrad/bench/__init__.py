"""``manualgrad bench`` (:mod:`~manualgrad.bench.bench`, the measuring): the models it measures
(:mod:`~manualgrad.bench.models`), its memory figures (:mod:`~manualgrad.bench.memory`), its text
and JSON output (:mod:`~manualgrad.bench.report`), and its NumPy/PyTorch peers
(:mod:`~manualgrad.bench.peers`, :mod:`~manualgrad.bench.sequence_peers`)."""
