"""beamvision commands: the ``beamvision`` CLI (``cli.py``) and one module per command.

Each command module (classify, prepare, train, tune, optimize, export,
evaluate, review, export_labels, list_models, demo) owns its flags
(``add_arguments``) and its frozen ``Config``, and is thin: parse, build the
pipeline or do the job, run. No command module imports another; what several
share lives beside them:

- ``flags``: the parser machinery, value types, Beam's pass-through and the
  flag groups several commands take;
- ``launch``: the run lifecycle of a Beam job (dry run, ``--detach``, claiming
  ``--output``, the progress line, the report it writes last);
- ``reports``: what a run prints, and reading a classify output back;
- ``labelstudio``: the Label Studio format, both directions;
- ``search_space`` and ``tune_report``: tune's space file and its report.

This is the top layer: it imports ``beamvision.transforms`` and
``beamvision.models``; nothing imports it.
"""
