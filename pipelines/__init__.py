"""beamvision commands: the ``beamvision`` CLI (``cli.py``) and one module per command.

Each module is thin: parse options (``options.py`` defines every flag), build
the pipeline or do the job, run. This is the top layer: it imports
``beamvision.transforms`` and ``beamvision.models``; nothing imports it.
"""
