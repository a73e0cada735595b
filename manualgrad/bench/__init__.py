"""``manualgrad bench`` (:mod:`~manualgrad.bench.bench`) and its NumPy/PyTorch peers
(:mod:`~manualgrad.bench.peers`)."""
