"""beamvision entry points: the ``beamvision`` CLI and one module per command.

Each module is thin: parse options, build the pipeline or do the job, run.
"""

__version__ = "0.1.0"
