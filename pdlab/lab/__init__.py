"""The lab's faces: the dashboard, plots, exercises (and their reference answers), the IPython
magics and the command line (``python -m pdlab``)."""
