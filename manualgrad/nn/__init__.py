"""Networks: stax-style layers and models (:mod:`~manualgrad.nn.layers`) and seed 002's
Algorithms 1 and 2 for whole networks (:mod:`~manualgrad.nn.backprop`)."""
