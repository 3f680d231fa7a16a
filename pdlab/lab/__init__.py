"""The lab's faces: the dashboard, plots, exercises (and their reference answers), the IPython
magics and the command line (``python -m pdlab``)."""

from pdlab._lazy import submodules

__getattr__ = submodules(__name__)
