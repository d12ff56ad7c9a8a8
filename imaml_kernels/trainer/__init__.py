"""The trainer: ``imaml-train`` and ``imaml-eval`` on top of the library.

Which module owns what (each imports only those listed before it, and the library):

- :mod:`.presets`: named configurations and their checks (a configuration is a flat dict);
- :mod:`.builders`: a configuration -> network, task samplers, inner solver, backward solve;
- :mod:`.checkpoint`: atomic checkpoints, their history (the last K) and their checks;
- :mod:`.runs`: the run folder (lock, files) and its metrics log;
- :mod:`.distributed`: data-parallel ranks (process group, spawning) and stop requests
  (SIGTERM, SIGUSR1, SIGINT, the launcher's flag; the preempted exit status 75); imports none
  of these;
- :mod:`.plots`: ``curves.png`` from the metrics log;
- :mod:`._cli_util`: what both command lines share (one-line errors, the ``--device`` check);
- :mod:`.evaluate`: the meta-test evaluation and ``imaml-eval``;
- :mod:`.loop`: :func:`~.loop.train`, the training loop (restore -> step, metrics,
  checkpoint -> evaluate);
- :mod:`.cli`: ``imaml-train`` (``python -m imaml_kernels.trainer``): flags, the run
  folder, spawning the ranks, then :func:`~.loop.train`.

The library (``imaml_kernels`` outside this package and ``data``) never imports from here.
"""
