"""The trainer: ``imaml-train`` and ``imaml-eval`` on top of the library.

- :mod:`.presets`: named configurations and their checks (a configuration is a flat dict);
- :mod:`.builders`: a configuration -> network, task samplers, inner solver;
- :mod:`.checkpoint`: atomic checkpoints and their checks;
- :mod:`.runs`: the run folder (lock, files) and its metrics log;
- :mod:`.distributed`: data-parallel ranks (process group, spawning);
- :mod:`.evaluate`: the meta-test evaluation and ``imaml-eval``;
- :mod:`._cli_util`: what both command lines share (one-line errors, the ``--device`` check).

The library (``imaml_kernels`` outside this package and ``data``) never imports from here.
"""
