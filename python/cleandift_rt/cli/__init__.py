"""The ``cleandift-rt`` command line: every command, the parser and the shared CLI helpers.

One module per command group, each adding its commands with ``register(sub)``: ``demo``,
``pictures`` (match, pca), ``extract``, ``info`` (info, build-info), ``bench``, ``evaluate``
(eval-spair, eval-pairs), ``train``, ``export`` (export-onnx, build-plan), ``hyper``
(train-aggregator), ``gate`` (train-gate, content-shift), ``probes`` (probe-depth, probe-seg,
knn-classify). ``main`` assembles them; ``common`` holds what they share (the engine, output and run
argument groups, one-line user errors, picture and JSON output), ``fusion_options`` the fusion-recipe
flags of eval-spair, eval-pairs and match. ``train/train.py`` and ``export/*.py`` at the top of the
repository are thin entry points into ``train`` and ``export``. This is the application layer: it may
import everything, and nothing in the library imports it.
"""
